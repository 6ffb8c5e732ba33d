#!/bin/sh
# Write the Mosquitto password file from MQTT_*_PASSWORD variables (deploy/mosquitto/users.env).
# Run by the `mosquitto-init` service before the broker starts. Passwords go through a file
# that `mosquitto_passwd -U` hashes in place, so they never appear in process arguments.
# Usage: make-passwd.sh PASSWORD_FILE
set -eu

out="${1:?usage: make-passwd.sh PASSWORD_FILE}"
tmp="$out.new"
umask 077
: >"$tmp"

add_user() { # add_user NAME VARIABLE
    value="$(printenv "$2" || true)"
    if [ -z "$value" ]; then
        rm -f "$tmp"
        echo "make-passwd.sh: $2 is not set (copy deploy/mosquitto/users.env.example)" >&2
        exit 2
    fi
    case "$value" in
        *:* | *"
"*)
            rm -f "$tmp"
            echo "make-passwd.sh: $2 must not contain ':' or a newline" >&2
            exit 2
            ;;
    esac
    printf '%s:%s\n' "$1" "$value" >>"$tmp"
}

add_user gateway MQTT_GATEWAY_PASSWORD
add_user ingest MQTT_INGEST_PASSWORD
add_user dashboard MQTT_DASHBOARD_PASSWORD

mosquitto_passwd -U "$tmp"
chmod 0600 "$tmp"
# In the container the broker drops to the `mosquitto` user, which must own the file.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$tmp"
fi
mv "$tmp" "$out"
echo "make-passwd.sh: wrote $out (users: gateway, ingest, dashboard)"

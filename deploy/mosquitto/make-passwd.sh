#!/bin/sh
# Write the Mosquitto password file and the roles file from deploy/mosquitto/users.env.
# Run by the `mosquitto-init` service before the broker starts. Passwords go through a file
# that `mosquitto_passwd -U` hashes in place, so they never appear in process arguments.
#
# The roles file is the dynamic-security plugin's configuration (mosquitto.conf): it holds no
# passwords, only which user belongs to which role, and what each role may subscribe to and
# read. Topic rights by name pattern (%u) are in deploy/mosquitto/acl. docs/security.md
# explains the roles:
#   station     user "{site}/{station}": publishes its own tree, reads its acknowledgements
#   ingest      reads points through $share/pumpgw-ingest/..., publishes nothing
#   dashboard   reads everything, acknowledges under its own name; no shared subscriptions
#
# Usage: make-passwd.sh PASSWORD_FILE [ROLES_FILE]   (default: roles.json beside the passwords)
set -eu

out="${1:?usage: make-passwd.sh PASSWORD_FILE [ROLES_FILE]}"
roles_out="${2:-$(dirname "$out")/roles.json}"
tmp="$out.new"
roles_tmp="$roles_out.new"
umask 077
: >"$tmp"
stations="" workers="" dashboards="" clients=""

fail() {
    rm -f "$tmp" "$roles_tmp"
    echo "make-passwd.sh: $*" >&2
    exit 2
}

add_user() { # add_user ROLE NAME PASSWORD_VARIABLE
    role="$1" name="$2"
    value="$(printenv "$3" || true)"
    [ -n "$value" ] || fail "$3 is not set (copy deploy/mosquitto/users.env.example)"
    case "$value" in
        *:* | *"
"*) fail "$3 must not contain ':' or a newline" ;;
    esac
    # Station users are "{site}/{station}"; every other name is one topic level, so that
    # the station patterns in the acl never reach a real topic for it.
    if [ "$role" = station ]; then
        echo "$name" | grep -Eqx '[A-Za-z0-9._-]{1,64}/[A-Za-z0-9._-]{1,64}' ||
            fail "station user '$name' must be {site}/{station} (letters, digits, . _ -)"
    else
        echo "$name" | grep -Eqx '[A-Za-z0-9._-]{1,64}' ||
            fail "user '$name' must be letters, digits, '.', '_' or '-' (no '/')"
    fi
    member="{\"username\": \"$name\"}"
    clients="${clients:+$clients, }$member"
    case "$role" in
        station) stations="${stations:+$stations, }$member" ;;
        ingest) workers="${workers:+$workers, }$member" ;;
        dashboard) dashboards="${dashboards:+$dashboards, }$member" ;;
        *) fail "unknown role '$role' (station, ingest, dashboard)" ;;
    esac
    printf '%s:%s\n' "$name" "$value" >>"$tmp"
}

# --- the users: one line each (role, user name, variable holding its password) -----------
add_user station "${MQTT_GATEWAY_USER:-demo/ward-sim}" MQTT_GATEWAY_PASSWORD
add_user ingest ingest-1 MQTT_INGEST_PASSWORD
add_user ingest ingest-2 MQTT_INGEST_PASSWORD
add_user dashboard dashboard MQTT_DASHBOARD_PASSWORD
add_user dashboard technician MQTT_TECHNICIAN_PASSWORD

acl() { # acl TYPE TOPIC ALLOW PRIORITY
    printf '{"acltype": "%s", "topic": "%s", "allow": %s, "priority": %s}' "$1" "$2" "$3" "$4"
}

# Topics a one-level user name would get from the station patterns in the acl.
not_a_station="$(acl publishClientSend 'pumpgw/+/pumps/#' false 9),
        $(acl publishClientSend 'pumpgw/+/gateway/#' false 9),
        $(acl publishClientSend 'pumpgw/+/deadletter' false 9)"

cat >"$roles_tmp" <<EOF
{
  "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false,
                       "subscribe": false, "unsubscribe": true},
  "clients": [$clients],
  "groups": [
    {"groupname": "stations", "roles": [{"rolename": "station"}], "clients": [$stations]},
    {"groupname": "ingest", "roles": [{"rolename": "ingest"}], "clients": [$workers]},
    {"groupname": "dashboards", "roles": [{"rolename": "dashboard"}], "clients": [$dashboards]}
  ],
  "roles": [
    {"rolename": "station", "acls": [
        $(acl subscribePattern '$share/#' false 0)]},
    {"rolename": "ingest", "acls": [
        $(acl subscribePattern '$share/pumpgw-ingest/pumpgw/#' true 1),
        $(acl subscribePattern '$share/#' false 0),
        $(acl publishClientSend '#' false 0),
        $(acl publishClientReceive 'pumpgw/+/+/pumps/+/telemetry' true 0),
        $(acl publishClientReceive 'pumpgw/+/+/pumps/+/events' true 0),
        $(acl publishClientReceive 'pumpgw/+/+/pumps/+/alerts' true 0),
        $(acl publishClientReceive 'pumpgw/+/+/gateway/alerts' true 0)]},
    {"rolename": "dashboard", "acls": [
        $(acl subscribePattern '$share/#' false 0),
        $(acl publishClientReceive 'pumpgw/#' true 0),
        $not_a_station]}
  ]
}
EOF

mosquitto_passwd -U "$tmp"
chmod 0600 "$tmp" "$roles_tmp"
# In the container the broker drops to the `mosquitto` user, which must own the files.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$tmp" "$roles_tmp"
fi
mv "$tmp" "$out"
mv "$roles_tmp" "$roles_out"
echo "make-passwd.sh: wrote $out and $roles_out"

// The broker connection: MQTT.js over WebSockets, MQTT 5. Credentials live only in this
// client's options in memory: never in a URL, storage or a log.
import mqtt from 'mqtt';

export const RECONNECT_PERIOD_MS = 1000;
export const CONNECT_TIMEOUT_MS = 5000;
export const KEEPALIVE_S = 20;
const AUTH_REFUSALS = { 4: 'bad user name or password', 5: 'not authorized',
  134: 'bad user name or password', 135: 'not authorized' };

/** The subscriptions of one ward view (a station, or every station of a site: `+`) with
 * their QoS. Readings at QoS 0: a live view gains nothing from acknowledging each of 1,000
 * readings a second, and a lost one is a gap in a trend; state, alerts and events at QoS 1.
 * The filters do not overlap, so the broker sends each message once. */
export function wardFilters(config) {
  const base = `${config.topic_prefix}/${config.site}/${config.station || '+'}`;
  const filters = { [`${base}/pumps/+/telemetry`]: { qos: 0 }, [`${base}/gateway/#`]: { qos: 1 } };
  for (const leaf of ['info', 'status', 'events', 'alerts', 'alerts/active']) {
    filters[`${base}/pumps/+/${leaf}`] = { qos: 1 };
  }
  return filters;
}

/** Connects with `user` and `password`; `on` receives connection events and messages. */
export function connect(config, user, password, on) {
  const client = mqtt.connect(config.broker_url, {
    protocolVersion: 5,
    username: user,
    password,
    clean: true,
    keepalive: KEEPALIVE_S,
    reconnectPeriod: RECONNECT_PERIOD_MS,
    connectTimeout: CONNECT_TIMEOUT_MS,
    clientId: `pumpgw-dashboard-${Math.random().toString(16).slice(2, 10)}`,
    resubscribe: true,
  });
  let everConnected = false;
  let refusedOnce = false;
  const refuse = (reason) => {
    client.end(true);
    if (!refusedOnce) on.refused(reason);
    refusedOnce = true;
  };
  client.on('connect', () => {
    const first = !everConnected;
    everConnected = true;
    if (first) {
      // MQTT.js re-sends these after every reconnect (resubscribe), and the broker sends
      // the retained state again: the ward is keyed by topic, so no row is duplicated.
      client.subscribe(wardFilters(config), (err) => {
        if (err) on.problem(`subscription refused: ${err.message}`);
      });
    }
    on.connected(first);
  });
  client.on('message', (topic, payload, packet) => on.message(topic, payload, packet));
  client.on('close', () => { if (everConnected && !refusedOnce) on.lost(); });
  client.on('error', (err) => {
    const refusal = AUTH_REFUSALS[err.code];
    if (refusal) {
      refuse(`The broker refused the login: ${refusal}. Check the user name and password.`);
    } else if (!everConnected) {
      refuse(`Cannot reach the broker at ${config.broker_url}: ${err.message}`);
    } else {
      on.problem(err.message);
    }
  });
  client.on('offline', () => {
    if (!everConnected) refuse(`Cannot reach the broker at ${config.broker_url}.`);
  });
  return client;
}

/** Publish an Acknowledgement; `done(reason)` gets null when the broker took it (PUBACK
 * success) or the broker's refusal (e.g. MQTT 5 reason 0x87 not authorized). */
export function publishAck(client, root, user, alertId, done) {
  const topic = `${root}/ack/${user}`;
  const body = JSON.stringify({ schema_version: 1, alert_id: alertId, by: user });
  client.publish(topic, body, { qos: 1, retain: false }, (err, packet) => {
    if (!err) { done(null); return; }
    const code = err.code ?? packet?.reasonCode;
    const hex = typeof code === 'number' ? ` (0x${code.toString(16).padStart(2, '0')})` : '';
    done(`refused by the broker: ${err.message.replace(/^Publish error: /, '')}${hex}`);
  });
}

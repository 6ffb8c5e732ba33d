// The ward's state, built from MQTT messages: pure, no DOM, no clock of its own (times are
// passed in). main.js feeds it; view.js draws it.

export const PRIORITY_ORDER = { PH: 0, PM: 1, PL: 2, PN: 3 };
export const TREND_POINTS = 1024; // per pump: bounded, preallocated (heap stays flat)
export const HISTORY_ITEMS = 50; // events and alert transitions kept per pump
export const LATENCY_WINDOW = 64; // live messages used for the clock-offset estimate
export const CONNECTION_SEQS = 2 ** 20; // gateway status seqs per connection (docs/topics.md)

/** Topic levels after the prefix: {site}/{station}/pumps/{id}/{leaf...} or gateway/{leaf...}. */
export function parseTopic(topic, prefix) {
  const levels = topic.split('/');
  if (levels[0] !== prefix || levels.length < 5) return null;
  const [, site, station, area, ...rest] = levels;
  const root = `${prefix}/${site}/${station}`;
  if (area === 'pumps' && rest.length >= 2) {
    return { root, site, station, pumpId: rest[0], leaf: rest.slice(1).join('/') };
  }
  if (area === 'gateway') return { root, site, station, pumpId: null, leaf: rest.join('/') };
  return null;
}

/** Milliseconds since the epoch of an ISO 8601 time, or null. */
export function ms(iso) {
  if (typeof iso !== 'string') return null;
  const value = Date.parse(iso);
  return Number.isFinite(value) ? value : null;
}

/** Estimates gateway time from the browser clock: gateway ≈ browser − offset. */
export class GatewayClock {
  constructor() {
    this.samples = [];
    this.offsetMs = 0;
    this.known = false;
  }

  /** A live (not retained, not historical) message stamped `gatewayMs` arrived at `browserMs`. */
  observe(gatewayMs, browserMs) {
    if (gatewayMs === null) return;
    this.samples.push(browserMs - gatewayMs);
    if (this.samples.length > LATENCY_WINDOW) this.samples.shift();
    // The smallest difference is the one with the least network and queueing delay in it.
    this.offsetMs = Math.min(...this.samples);
    this.known = true;
  }

  now(browserMs) {
    return browserMs - this.offsetMs;
  }
}

/** Whether a gateway status replaces the one held (docs/topics.md, "Retained state a
 * consumer can verify", rule 1): within a session the highest `seq` wins; another session is
 * a restart when the held status is `offline` or the new one is later. */
export function isNewerGatewayStatus(incoming, held) {
  if (!held) return true;
  const { session_id: session, seq } = incoming;
  if (session === undefined || seq === undefined) return held.session_id === undefined;
  if (session === held.session_id) return seq > held.seq;
  if (held.state === 'offline') return true;
  const inAt = ms(incoming.at);
  const heldAt = ms(held.at);
  return inAt !== null && heldAt !== null && inAt > heldAt;
}

/** Whether a gateway status is a birth: `online`, the first seq of its connection (each
 * connection owns CONNECTION_SEQS seqs and its birth takes the first). The gateway then
 * listens for acknowledgements again: one sent before and never answered may be lost. */
export function isBirth(status) {
  return status.state === 'online' && Number.isInteger(status.seq) && status.seq % CONNECTION_SEQS === 0;
}

/** Whether a retained `status` or `alerts/active` message may be shown (rules 2 and 3): it
 * comes from the station's current session and its `seq` is above the one held for its
 * topic. One from another session, or without a session, is stale or foreign. */
export function isCurrentState(incoming, held, sessionId) {
  if (sessionId === null || incoming.session_id !== sessionId) return false;
  if (typeof incoming.seq !== 'number') return false;
  return !held || held.session_id !== sessionId || incoming.seq > held.seq;
}

/** Whether an AckRefusal (with its station's `root`) answers `ack`, the acknowledgement this
 * page sent for that alert as `user`: same alert, station and MQTT user. */
export function refusalAnswers(refusal, ack, user) {
  return Boolean(ack) && ack.root === refusal.root && refusal.username === user;
}

/** The refusal as the alert row shows it: the gateway's reason kind, then its words. */
export function refusalText(refusal) {
  return `${refusal.reason_kind}: ${refusal.reason}`;
}

function ring(size) {
  return { t: new Float64Array(size), reservoir: new Float32Array(size),
    rate: new Float32Array(size), start: 0, count: 0 };
}

function pushRing(buffer, t, reservoir, rate) {
  const size = buffer.t.length;
  const at = (buffer.start + buffer.count) % size;
  buffer.t[at] = t;
  buffer.reservoir[at] = reservoir;
  buffer.rate[at] = rate;
  if (buffer.count < size) buffer.count += 1;
  else buffer.start = (buffer.start + 1) % size;
}

/** The trend in time order, as uPlot data: [t (s), reservoir mL, rate mL/day]. */
export function trendSeries(buffer) {
  const t = []; const reservoir = []; const rate = [];
  for (let i = 0; i < buffer.count; i += 1) {
    const at = (buffer.start + i) % buffer.t.length;
    t.push(buffer.t[at] / 1000);
    reservoir.push(buffer.reservoir[at]);
    rate.push(buffer.rate[at]);
  }
  return [t, reservoir, rate];
}

function pushBounded(list, item) {
  list.push(item);
  if (list.length > HISTORY_ITEMS) list.shift();
}

/** The pump's key values from its latest reading, else from its retained status and info
 * (readings are not retained: a page that has just opened knows only those). */
export function keyValues(pump) {
  const { reading, status, info } = pump;
  const prescription = info?.prescription;
  return {
    drug: reading?.drug ?? info?.drug ?? null,
    reservoir_ml: reading?.reservoir_ml ?? status?.reservoir_ml ?? null,
    basal_rate_ml_per_day: reading?.basal_rate_ml_per_day ?? prescription?.basal_rate_ml_per_day ?? null,
    low_reservoir_alarm_ml: reading?.low_reservoir_alarm_ml ?? prescription?.low_reservoir_alarm_ml ?? null,
    battery_state: reading?.battery_state ?? status?.battery_state ?? null,
    pump_state: reading?.pump_state ?? status?.pump_state ?? null,
  };
}

/** Days until the low-reservoir alarm at the programmed rate plus the maximum daily boluses
 * (DOMAIN.md 1.5); null when the rate is zero or unknown. */
export function daysToLowAlarm(reading, info) {
  if (!reading || reading.reservoir_ml === null || reading.low_reservoir_alarm_ml === null) return null;
  const prescription = info?.prescription;
  const bolusMlPerDay = prescription
    ? prescription.bolus_dose_ml * prescription.boluses_per_day_max : 0;
  const perDay = reading.basal_rate_ml_per_day + bolusMlPerDay;
  if (!(perDay > 0)) return null;
  return Math.max(0, (reading.reservoir_ml - reading.low_reservoir_alarm_ml) / perDay);
}

/** Active alerts of the whole ward, highest priority first, then the earliest start. */
export function sortedAlerts(ward) {
  const all = [];
  for (const station of ward.stations.values()) {
    for (const alert of station.gatewayAlerts.values()) all.push({ alert, pumpKey: null, station });
  }
  for (const pump of ward.pumps.values()) {
    for (const alert of pump.alerts.values()) all.push({ alert, pumpKey: pump.key, station: pump.station });
  }
  all.sort((a, b) => (PRIORITY_ORDER[a.alert.priority] ?? 9) - (PRIORITY_ORDER[b.alert.priority] ?? 9)
    || alertStartMs(a.alert) - alertStartMs(b.alert)
    || a.alert.alert_id.localeCompare(b.alert.alert_id));
  return all;
}

/** When the alert started: its `start` transition's time, kept as `started_at` by the ward. */
export function alertStartMs(alert) {
  return ms(alert.started_at ?? alert.at) ?? 0;
}

export class Ward {
  constructor(prefix) {
    this.prefix = prefix;
    this.pumps = new Map(); // key `${root}|${pumpId}`
    this.stations = new Map(); // key root
    this.clock = new GatewayClock();
    this.alertsChanged = true;
    this.dirty = new Set(); // pump keys to redraw
    this.stationsChanged = true;
    this.receipts = []; // acknowledged transitions, for the acknowledgement tracker
    this.refusals = []; // the gateway's AckRefusals, for the acknowledgement tracker
    this.births = []; // roots of stations whose gateway (re)connected: resend unanswered acks
  }

  station(root, site, name) {
    let station = this.stations.get(root);
    if (!station) {
      station = { root, site, name, gatewayStatus: null, gatewayState: 'unknown',
        offlineSinceMs: null, offlineRetained: false, gatewayAlerts: new Map(),
        sessionId: null, // the gateway session whose retained state is shown
        held: new Map(), // topic -> the shown status or alerts/active message
        parked: new Map() }; // topic -> the newest one of another (or no) session, not shown
      this.stations.set(root, station);
    }
    return station;
  }

  pump(where) {
    const key = `${where.root}|${where.pumpId}`;
    let pump = this.pumps.get(key);
    if (!pump) {
      pump = { key, id: where.pumpId, station: this.station(where.root, where.site, where.station),
        info: null, reading: null, readingMs: null, status: null, alerts: new Map(),
        trend: ring(TREND_POINTS), events: [], alertHistory: [] };
      this.pumps.set(key, pump);
    }
    return pump;
  }

  /** Apply one message; `live` is false for retained and historical ones. Returns whether used. */
  apply(topic, data, { retained, historical, browserMs }) {
    const where = parseTopic(topic, this.prefix);
    if (!where || data === null || typeof data !== 'object') return false;
    const live = !retained && !historical;
    // The gateway's birth carries the time it was written, not sent: no clock sample.
    const birth = where.pumpId === null && where.leaf === 'status';
    if (live && !birth) this.clock.observe(ms(data.received_at ?? data.at), browserMs);
    const station = this.station(where.root, where.site, where.station);
    if (where.pumpId === null) return this.applyGateway(station, where.leaf, data, retained, browserMs);
    if (where.leaf === 'alerts/active' || where.leaf === 'status') {
      return this.applyState(station, topic, data, () => this.pump(where));
    }
    const pump = this.pump(where);
    this.dirty.add(pump.key);
    switch (where.leaf) {
      case 'telemetry': return this.applyReading(pump, data);
      case 'info': pump.info = data; return true;
      case 'events': pushBounded(pump.events, data); return true;
      case 'alerts': return this.applyTransition(pump.alerts, pump, data, historical);
      default: return false;
    }
  }

  /** A retained state message (a pump's `status` or `alerts/active`, the gateway's
   * `alerts/active`): shown only when it is of the current session and newer than the one
   * shown; else parked until its session becomes the current one. */
  applyState(station, topic, data, target) {
    if (!isCurrentState(data, station.held.get(topic), station.sessionId)) {
      const parked = station.parked.get(topic);
      const sameSession = parked && parked.session_id === data.session_id;
      if (data.session_id !== station.sessionId && (!sameSession || data.seq > parked.seq)) {
        station.parked.set(topic, data);
      }
      return false;
    }
    station.held.set(topic, data);
    station.parked.delete(topic);
    const leaf = topic.slice(station.root.length + 1);
    if (leaf === 'gateway/alerts/active') return this.applyActive(station.gatewayAlerts, data);
    const pump = target();
    this.dirty.add(pump.key);
    if (leaf.endsWith('/status')) {
      pump.status = data;
      return true;
    }
    return this.applyActive(pump.alerts, data);
  }

  /** The gateway restarted (or its session became known): what the previous session said is
   * no longer shown, and what arrived parked from the new session is. */
  changeSession(station, sessionId) {
    station.sessionId = sessionId;
    for (const pump of this.pumps.values()) {
      if (pump.station !== station) continue;
      if (pump.status !== null || pump.alerts.size > 0) this.dirty.add(pump.key);
      pump.status = null;
      pump.alerts.clear();
    }
    station.gatewayAlerts.clear();
    station.held.clear();
    this.alertsChanged = true;
    const parked = [...station.parked].filter(([, data]) => data.session_id === sessionId);
    for (const [topic] of parked) station.parked.delete(topic);
    for (const [topic, data] of parked) {
      const where = parseTopic(topic, this.prefix);
      this.applyState(station, topic, data, () => this.pump(where));
    }
  }

  applyGateway(station, leaf, data, retained, browserMs) {
    if (leaf === 'status') {
      if (!isNewerGatewayStatus(data, station.gatewayStatus)) return false;
      station.gatewayStatus = data;
      if (isBirth(data)) this.births.push(station.root);
      if ((data.session_id ?? null) !== station.sessionId) this.changeSession(station, data.session_id ?? null);
      const wasOnline = station.gatewayState !== 'offline';
      station.gatewayState = data.state === 'online' ? 'online' : 'offline';
      if (station.gatewayState === 'offline' && (wasOnline || station.offlineSinceMs === null)) {
        // The will was written when the gateway connected: its `at` is not when it vanished.
        station.offlineSinceMs = this.clock.now(browserMs);
        station.offlineRetained = retained;
      }
      if (station.gatewayState === 'online') station.offlineSinceMs = null;
      this.stationsChanged = true;
      for (const pump of this.pumps.values()) if (pump.station === station) this.dirty.add(pump.key);
      return true;
    }
    if (leaf === 'alerts/active') return this.applyState(station, `${station.root}/gateway/${leaf}`, data, null);
    if (leaf === 'alerts') return this.applyTransition(station.gatewayAlerts, null, data, false);
    if (leaf === 'acks/refused' && !retained) {
      this.refusals.push({ ...data, root: station.root });
      return true;
    }
    return false;
  }

  applyReading(pump, reading) {
    pump.reading = reading;
    pump.readingMs = ms(reading.received_at);
    if (pump.readingMs !== null) {
      pushRing(pump.trend, pump.readingMs, reading.reservoir_ml, reading.basal_rate_ml_per_day);
    }
    return true;
  }

  applyActive(alerts, data) {
    if (!Array.isArray(data.alerts)) return false;
    const fresh = new Map();
    for (const alert of data.alerts) {
      const held = alerts.get(alert.alert_id);
      fresh.set(alert.alert_id, withStart(alert, held));
    }
    alerts.clear();
    for (const [id, alert] of fresh) alerts.set(id, alert);
    this.alertsChanged = true;
    return true;
  }

  applyTransition(alerts, pump, transition, historical) {
    if (pump) pushBounded(pump.alertHistory, transition);
    if (transition.phase === 'acknowledged') this.receipts.push(transition);
    if (historical) return true; // history only: the retained alerts/active holds the state
    const held = alerts.get(transition.alert_id);
    if (transition.phase === 'end') alerts.delete(transition.alert_id);
    else {
      alerts.set(transition.alert_id, withStart(transition, held));
    }
    this.alertsChanged = true;
    return true;
  }

  takeReceipts() {
    const receipts = this.receipts;
    this.receipts = [];
    return receipts;
  }

  /** Roots of the stations whose gateway was born since the last call. */
  takeBirths() {
    const births = this.births;
    this.births = [];
    return births;
  }

  /** The AckRefusals received since the last call, each with its station's `root`. */
  takeRefusals() {
    const refusals = this.refusals;
    this.refusals = [];
    return refusals;
  }
}

/** The alert with `started_at` and whether that is its real start (`start_known`): a retained
 * alerts/active holds each alert's latest transition, whose `at` may be a later change. */
function withStart(alert, held) {
  if (held?.start_known) return { ...alert, started_at: held.started_at, start_known: true };
  if (alert.phase === 'start') return { ...alert, started_at: alert.at, start_known: true };
  if (alert.started_at) return { ...alert, start_known: true };
  return { ...alert, started_at: held?.started_at ?? alert.at, start_known: false };
}

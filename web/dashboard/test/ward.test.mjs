// The ward's pure state (src/ward.js): run with `npm test` (node's test runner);
// tests/unit/test_dashboard_js.py runs it in the Python suite.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  CONNECTION_SEQS, GatewayClock, TREND_POINTS, Ward, daysToLowAlarm, isBirth, isCurrentState, isNewerGatewayStatus, keyValues,
  parseTopic, refusalAnswers, refusalText, sortedAlerts, trendSeries,
} from '../src/ward.js';

const ROOT = 'pumpgw/north/ward-3';
const MINUTE_MS = 60_000;

function reading(seq, receivedAt, extra = {}) {
  return { kind: 'reading', pump_id: 'P1', boot_id: 'b', seq, received_at: receivedAt,
    drug: 'morphine', reservoir_ml: 10, low_reservoir_alarm_ml: 2, basal_rate_ml_per_day: 0.5,
    battery_state: 'ok', pump_state: 'running', ...extra };
}

function alert(id, priority, at, phase = 'start') {
  return { alert_id: id, priority, at, phase, pump_id: 'P1', text: id, alert_type: 'ST' };
}

test('topics are split into station root, pump and leaf', () => {
  assert.deepEqual(parseTopic(`${ROOT}/pumps/P1/alerts/active`, 'pumpgw'),
    { root: ROOT, site: 'north', station: 'ward-3', pumpId: 'P1', leaf: 'alerts/active' });
  assert.equal(parseTopic(`${ROOT}/gateway/status`, 'pumpgw').pumpId, null);
  assert.equal(parseTopic('other/north/ward-3/pumps/P1/status', 'pumpgw'), null);
});

test('a browser clock an hour ahead does not make a fresh reading look old', () => {
  const clock = new GatewayClock();
  const gatewayNow = Date.parse('2026-12-04T12:00:00Z');
  const browserNow = gatewayNow + 60 * MINUTE_MS; // the browser's clock is an hour fast
  clock.observe(gatewayNow - 40, browserNow); // a live message 40 ms on its way
  clock.observe(gatewayNow - 900, browserNow); // one that waited in a queue
  assert.equal(clock.now(browserNow), gatewayNow - 40);
  assert.ok(clock.known);
});

test('only live messages stamped when sent set the clock: not retained ones, not the birth', () => {
  const ward = new Ward('pumpgw');
  const browserMs = Date.parse('2026-12-04T13:00:00Z');
  ward.apply(`${ROOT}/pumps/P1/status`, { telemetry: 'ok', at: '2026-12-04T12:00:00Z' },
    { retained: true, historical: false, browserMs });
  ward.apply(`${ROOT}/gateway/status`, { state: 'online', at: '2026-12-04T11:00:00Z' },
    { retained: false, historical: false, browserMs });
  assert.ok(!ward.clock.known);
  ward.apply(`${ROOT}/pumps/P1/status`, { telemetry: 'ok', at: '2026-12-04T12:59:59Z' },
    { retained: false, historical: false, browserMs });
  assert.equal(ward.clock.offsetMs, 1000);
});

const RETAINED = { retained: true, historical: false, browserMs: 0 };

function birth(session, seq = 0, at = '2026-12-04T12:00:00Z', state = 'online') {
  return { kind: 'gateway_status', session_id: session, seq, state, at };
}

function activeSet(session, seq, ...ids) {
  return { kind: 'active_alerts', session_id: session, seq,
    alerts: ids.map((id) => alert(id, 'PH', '2026-12-04T12:00:00Z')) };
}

test('the gateway status with the highest seq of the newest session is the gateway\'s state', () => {
  const held = birth('s1', 10);
  assert.ok(!isNewerGatewayStatus(birth('s1', 9, '2026-12-04T12:00:05Z'), held));
  assert.ok(isNewerGatewayStatus(birth('s1', 11, '2026-12-04T11:00:00Z'), held));
  assert.ok(isNewerGatewayStatus(birth('s2', 0, '2026-12-04T12:01:00Z'), held), 'a later session');
  assert.ok(!isNewerGatewayStatus(birth('s0', 99, '2026-12-04T11:59:00Z'), held), 'an earlier one');
  assert.ok(isNewerGatewayStatus(birth('s0', 0, '2026-12-04T11:59:00Z'), birth('s1', 5, '2026-12-04T12:00:00Z', 'offline')),
    'a new session after offline is a restart');
  assert.ok(!isNewerGatewayStatus({ state: 'online', at: '2026-12-04T13:00:00Z' }, held), 'no session: foreign');
});

test('a birth is the first online status of a connection; the ward reports it once', () => {
  assert.ok(isBirth(birth('s', 0)));
  assert.ok(isBirth(birth('s', 3 * CONNECTION_SEQS)));
  assert.ok(!isBirth(birth('s', 3 * CONNECTION_SEQS + 1)), 'a re-assertion');
  assert.ok(!isBirth(birth('s', 4 * CONNECTION_SEQS - 1, undefined, 'offline')), 'a will');
  const ward = new Ward('pumpgw');
  ward.apply(`${ROOT}/gateway/status`, birth('s', CONNECTION_SEQS - 1, undefined, 'offline'), RETAINED);
  ward.apply(`${ROOT}/gateway/status`, birth('s', CONNECTION_SEQS), RETAINED);
  ward.apply(`${ROOT}/gateway/status`, birth('s', CONNECTION_SEQS), RETAINED);
  ward.apply(`${ROOT}/gateway/status`, birth('s', CONNECTION_SEQS + 1), RETAINED);
  assert.deepEqual(ward.takeBirths(), [ROOT]);
  assert.deepEqual(ward.takeBirths(), []);
});

test('state is current only from the current session and above the seq shown', () => {
  assert.ok(isCurrentState(activeSet('s', 5), activeSet('s', 4), 's'));
  assert.ok(!isCurrentState(activeSet('s', 4), activeSet('s', 5), 's'));
  assert.ok(!isCurrentState(activeSet('old', 99), activeSet('s', 5), 's'), 'another session');
  assert.ok(!isCurrentState({ alerts: [] }, null, 's'), 'without session and seq');
  assert.ok(!isCurrentState(activeSet('s', 1), null, null), 'session not known yet');
});

test('the ward ignores a stale retained status but takes a newer one', () => {
  const ward = new Ward('pumpgw');
  const topic = `${ROOT}/pumps/P1/status`;
  ward.apply(`${ROOT}/gateway/status`, birth('s'), RETAINED);
  ward.apply(topic, { session_id: 's', seq: 5, telemetry: 'ok', at: '2026-12-04T12:00:00Z' }, RETAINED);
  ward.apply(topic, { session_id: 's', seq: 4, telemetry: 'lost', at: '2026-12-04T11:00:00Z' }, RETAINED);
  assert.equal([...ward.pumps.values()][0].status.telemetry, 'ok');
  ward.apply(topic, { session_id: 's', seq: 6, telemetry: 'lost', at: '2026-12-04T12:01:00Z' }, RETAINED);
  assert.equal([...ward.pumps.values()][0].status.telemetry, 'lost');
});

test('an older alerts/active of the same session after a newer one is ignored', () => {
  const ward = new Ward('pumpgw');
  const topic = `${ROOT}/pumps/P1/alerts/active`;
  ward.apply(`${ROOT}/gateway/status`, birth('s'), RETAINED);
  assert.ok(ward.apply(topic, activeSet('s', 8, 'newer'), RETAINED));
  assert.ok(!ward.apply(topic, activeSet('s', 7, 'older'), RETAINED));
  assert.deepEqual(sortedAlerts(ward).map((e) => e.alert.alert_id), ['newer']);
});

test('state that arrives before the gateway status waits for it; a foreign session never shows', () => {
  const ward = new Ward('pumpgw');
  const topic = `${ROOT}/pumps/P1/alerts/active`;
  ward.apply(topic, activeSet('s2', 3, 'current'), RETAINED);
  ward.apply(`${ROOT}/pumps/P2/alerts/active`, activeSet('s1', 40, 'foreign'), RETAINED);
  ward.apply(`${ROOT}/pumps/P3/alerts/active`, { alerts: [alert('unsigned', 'PH', '2026-12-04T12:00:00Z')] }, RETAINED);
  assert.deepEqual(sortedAlerts(ward), []);
  ward.apply(`${ROOT}/gateway/status`, birth('s2'), RETAINED);
  assert.deepEqual(sortedAlerts(ward).map((e) => e.alert.alert_id), ['current']);
});

test('a gateway restart hides the previous session\'s state until the new one asserts it', () => {
  const ward = new Ward('pumpgw');
  const topic = `${ROOT}/pumps/P1/alerts/active`;
  ward.apply(`${ROOT}/gateway/status`, birth('s1', 0, '2026-12-04T12:00:00Z'), RETAINED);
  ward.apply(topic, activeSet('s1', 50, 'before'), RETAINED);
  ward.apply(`${ROOT}/gateway/status`, birth('s2', 0, '2026-12-04T13:00:00Z'), RETAINED);
  assert.deepEqual(sortedAlerts(ward), []);
  ward.apply(topic, activeSet('s1', 51, 'replayed'), RETAINED);
  assert.deepEqual(sortedAlerts(ward), [], 'a replayed copy of the old session stays hidden');
  ward.apply(topic, activeSet('s2', 1, 'after'), RETAINED);
  assert.deepEqual(sortedAlerts(ward).map((e) => e.alert.alert_id), ['after']);
});

test('the gateway\'s refusals are collected with their station; one answers only its own ack', () => {
  const ward = new Ward('pumpgw');
  const refusal = { kind: 'ack_refusal', username: 'viewer', alert_id: 'P1:stall:1',
    reason_kind: 'not_allowed', reason: "MQTT user 'viewer' is not in gateway.ack_allowed",
    at: '2026-12-04T12:00:00Z' };
  ward.apply(`${ROOT}/gateway/acks/refused`, refusal, { retained: false, historical: false, browserMs: 0 });
  const [taken] = ward.takeRefusals();
  assert.equal(taken.root, ROOT);
  assert.deepEqual(ward.takeRefusals(), []);
  assert.ok(refusalAnswers(taken, { root: ROOT, pending: true }, 'viewer'));
  assert.ok(!refusalAnswers(taken, { root: ROOT, pending: true }, 'dashboard'), 'another user');
  assert.ok(!refusalAnswers(taken, { root: 'pumpgw/north/ward-4', pending: true }, 'viewer'));
  assert.ok(!refusalAnswers(taken, undefined, 'viewer'), 'not sent from this page');
  assert.match(refusalText(taken), /^not_allowed: MQTT user 'viewer' is not in gateway.ack_allowed$/);
});

test('alerts sort by priority, then by start time', () => {
  const ward = new Ward('pumpgw');
  const opts = { retained: false, historical: false, browserMs: Date.parse('2026-12-04T12:10:00Z') };
  ward.apply(`${ROOT}/pumps/P1/alerts`, alert('low', 'PM', '2026-12-04T12:00:00Z'), opts);
  ward.apply(`${ROOT}/pumps/P1/alerts`, alert('stall-late', 'PH', '2026-12-04T12:05:00Z'), opts);
  ward.apply(`${ROOT}/pumps/P1/alerts`, alert('stall', 'PH', '2026-12-04T12:01:00Z'), opts);
  ward.apply(`${ROOT}/pumps/P1/alerts`, alert('refill', 'PL', '2026-12-04T11:00:00Z'), opts);
  assert.deepEqual(sortedAlerts(ward).map((e) => e.alert.alert_id), ['stall', 'stall-late', 'low', 'refill']);
});

test('an acknowledged transition keeps the alert with its start and is a receipt; end removes it', () => {
  const ward = new Ward('pumpgw');
  const topic = `${ROOT}/pumps/P1/alerts`;
  const opts = { retained: false, historical: false, browserMs: 0 };
  ward.apply(topic, alert('a', 'PM', '2026-12-04T12:00:00Z'), opts);
  ward.apply(topic, { ...alert('a', 'PM', '2026-12-04T12:03:00Z', 'acknowledged'),
    inactivation: 'alert-acknowledged', acknowledged_by: 'nurse' }, opts);
  const held = [...ward.pumps.values()][0].alerts.get('a');
  assert.equal(held.started_at, '2026-12-04T12:00:00Z');
  assert.equal(held.acknowledged_by, 'nurse');
  assert.deepEqual(ward.takeReceipts().map((r) => r.alert_id), ['a']);
  ward.apply(topic, alert('a', 'PM', '2026-12-04T12:09:00Z', 'end'), opts);
  assert.equal([...ward.pumps.values()][0].alerts.size, 0);
});

test('historical alert transitions fill history only', () => {
  const ward = new Ward('pumpgw');
  ward.apply(`${ROOT}/pumps/P1/alerts`, alert('old', 'PH', '2026-12-01T12:00:00Z'),
    { retained: false, historical: true, browserMs: 0 });
  const pump = [...ward.pumps.values()][0];
  assert.equal(pump.alerts.size, 0);
  assert.equal(pump.alertHistory.length, 1);
});

test('days to the low-reservoir alarm count the maximum daily boluses', () => {
  const info = { prescription: { bolus_dose_ml: 0.05, boluses_per_day_max: 4, basal_rate_ml_per_day: 0.3 } };
  assert.equal(daysToLowAlarm({ reservoir_ml: 7, low_reservoir_alarm_ml: 2, basal_rate_ml_per_day: 0.3 }, info), 10);
  assert.equal(daysToLowAlarm({ reservoir_ml: 1, low_reservoir_alarm_ml: 2, basal_rate_ml_per_day: 0.3 }, info), 0);
  assert.equal(daysToLowAlarm({ reservoir_ml: 7, low_reservoir_alarm_ml: 2, basal_rate_ml_per_day: 0 }, null), null);
});

test('before the first reading the tile uses the retained status and info', () => {
  const values = keyValues({ reading: null, status: { reservoir_ml: 4.5, battery_state: 'eri' },
    info: { drug: 'baclofen', prescription: { basal_rate_ml_per_day: 0.2, low_reservoir_alarm_ml: 4 } } });
  assert.equal(values.reservoir_ml, 4.5);
  assert.equal(values.drug, 'baclofen');
  assert.equal(values.low_reservoir_alarm_ml, 4);
});

test('the trend buffer is bounded and stays in time order', () => {
  const ward = new Ward('pumpgw');
  const start = Date.parse('2026-12-04T00:00:00Z');
  for (let i = 0; i < TREND_POINTS + 10; i += 1) {
    ward.apply(`${ROOT}/pumps/P1/telemetry`, reading(i, new Date(start + i * 1000).toISOString()),
      { retained: false, historical: false, browserMs: start + i * 1000 });
  }
  const [t] = trendSeries([...ward.pumps.values()][0].trend);
  assert.equal(t.length, TREND_POINTS);
  assert.equal(t[0], start / 1000 + 10);
  assert.ok(t.every((value, i) => i === 0 || value > t[i - 1]));
});

test('the subscriptions do not overlap: readings at QoS 0, state and alerts at QoS 1', async () => {
  const { wardFilters } = await import('../src/connection.js');
  const station = wardFilters({ topic_prefix: 'pumpgw', site: 'north', station: 'ward-3' });
  assert.equal(station['pumpgw/north/ward-3/pumps/+/telemetry'].qos, 0);
  assert.equal(station['pumpgw/north/ward-3/pumps/+/alerts/active'].qos, 1);
  assert.ok(!Object.keys(station).some((filter) => filter.endsWith('/pumps/#')));
  const site = wardFilters({ topic_prefix: 'pumpgw', site: 'north', station: '' });
  assert.ok(Object.keys(site).every((filter) => filter.startsWith('pumpgw/north/+/')));
});

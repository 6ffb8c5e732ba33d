// The ward's pure state (src/ward.js): run with `npm test` (node's test runner);
// tests/unit/test_dashboard_js.py runs it in the Python suite.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  GatewayClock, TREND_POINTS, Ward, daysToLowAlarm, isOlder, keyValues, parseTopic, sortedAlerts,
  trendSeries,
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

test('an older retained status of the same session is ignored, a newer session wins', () => {
  const held = { session_id: 's1', seq: 10, at: '2026-12-04T12:00:00Z' };
  assert.ok(isOlder({ session_id: 's1', seq: 9, at: '2026-12-04T12:00:05Z' }, held));
  assert.ok(!isOlder({ session_id: 's1', seq: 11, at: '2026-12-04T11:00:00Z' }, held));
  assert.ok(!isOlder({ session_id: 's2', seq: 0, at: '2026-12-04T12:01:00Z' }, held));
  assert.ok(isOlder({ session_id: 's0', seq: 99, at: '2026-12-04T11:59:00Z' }, held));
  assert.ok(!isOlder({ at: '2026-12-04T11:00:00Z' }, held), 'without session and seq: accepted');
});

test('the ward ignores a stale retained status but takes a newer one', () => {
  const ward = new Ward('pumpgw');
  const topic = `${ROOT}/pumps/P1/status`;
  const opts = { retained: true, historical: false, browserMs: 0 };
  ward.apply(topic, { session_id: 's', seq: 5, telemetry: 'ok', at: '2026-12-04T12:00:00Z' }, opts);
  ward.apply(topic, { session_id: 's', seq: 4, telemetry: 'lost', at: '2026-12-04T11:00:00Z' }, opts);
  assert.equal([...ward.pumps.values()][0].status.telemetry, 'ok');
  ward.apply(topic, { session_id: 's', seq: 6, telemetry: 'lost', at: '2026-12-04T12:01:00Z' }, opts);
  assert.equal([...ward.pumps.values()][0].status.telemetry, 'lost');
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

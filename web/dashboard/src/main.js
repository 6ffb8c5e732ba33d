// Wiring: login, the broker connection, the ward state, acknowledgements and drawing.
import 'uplot/dist/uPlot.min.css';
import './style.css';
import { Broker } from './broker.js';
import { Ward, refusalAnswers, refusalText } from './ward.js';
import { AlertList, PumpGrid, clockTime } from './view.js';
import { PumpDetail } from './detail.js';

const AGE_REFRESH_MS = 1000;
const TILE_DRAW_MS = 250;

const $ = (selector) => document.querySelector(selector);

const STATS_KEEP = 10000;
const SAMPLE_EVERY = 20; // arrival times of every 20th reading of a pump, for the benchmark

/** Counters a benchmark or a curious operator can read from the console (bounded lists):
 * lagMs: reading age on arrival on the estimated gateway clock, browserAgeMs the same on the
 * browser's clock (equal clocks on one machine); drawMs: main-thread time per frame;
 * handleMs: main-thread time spent on the decoded messages (worker.js decodes);
 * arrivals: [record id, arrival s] of sampled readings, which the benchmark compares with a
 * plain subscriber's. */
const stats = { messages: 0, ignored: 0, lagMs: [], browserAgeMs: [], drawMs: [], frames: 0,
  connectedAt: null, handleMs: 0, arrivals: [] };

function keep(list, value) {
  list.push(value);
  if (list.length > STATS_KEEP) list.splice(0, STATS_KEEP / 2);
}

class App {
  constructor(config) {
    this.config = config;
    this.ward = new Ward(config.topic_prefix);
    this.client = null;
    this.user = null;
    this.brokerLostSinceMs = null;
    this.acks = new Map(); // alert_id -> { root, pending, refused, unanswered, timer }
    this.grid = new PumpGrid($('#pumps'), (key) => this.openDetail(key));
    this.alerts = new AlertList($('#alerts'), $('#alert-count'), {
      ack: (entry) => this.acknowledge(entry),
      ackState: (id) => this.acks.get(id),
      canAck: () => this.client !== null,
    });
    this.detail = new PumpDetail($('#detail'));
    this.scheduled = false;
    this.lastDrawMs = 0;
    setInterval(() => this.refreshAges(), AGE_REFRESH_MS);
  }

  ctx() {
    const browserNow = Date.now();
    return {
      gatewayNowMs: this.ward.clock.now(browserNow),
      clockKnown: this.ward.clock.known,
      brokerLostSinceMs: this.brokerLostSinceMs,
    };
  }

  login(user, password) {
    $('#login-error').textContent = '';
    $('#login button').disabled = true;
    this.user = user;
    this.client = new Broker({
      connected: () => this.onConnected(),
      lost: () => this.onLost(),
      refused: (reason) => this.onRefused(reason),
      problem: (reason) => { $('#banner-detail').textContent = reason; },
      messages: (batch, ignored) => this.onMessages(batch, ignored),
    });
    this.client.connect(this.config, user, password);
  }

  onConnected() {
    if (stats.connectedAt === null) stats.connectedAt = performance.now();
    document.body.classList.add('signed-in');
    $('#user').textContent = this.user;
    this.brokerLostSinceMs = null;
    $('#banner').hidden = true;
    $('#connection').textContent = 'connected';
    $('#connection').dataset.state = 'connected';
    this.markAllDirty();
  }

  onLost() {
    // Every time shown is on the gateway's clock (its timestamps, and ours converted).
    if (this.brokerLostSinceMs === null) this.brokerLostSinceMs = this.ward.clock.now(Date.now());
    $('#banner').hidden = false;
    $('#banner-text').textContent = `Connection to the broker lost since ${clockTime(this.brokerLostSinceMs)}: values are stale; reconnecting…`;
    $('#connection').textContent = 'reconnecting';
    $('#connection').dataset.state = 'lost';
    this.markAllDirty();
  }

  onRefused(reason) {
    this.client?.close();
    this.client = null;
    document.body.classList.remove('signed-in');
    $('#login button').disabled = false;
    $('#login-error').textContent = reason;
  }

  onMessages(batch, ignored) {
    const started = performance.now();
    stats.ignored += ignored;
    stats.messages += ignored;
    for (const message of batch) this.handle(message);
    for (const receipt of this.ward.takeReceipts()) this.receiptArrived(receipt);
    for (const refusal of this.ward.takeRefusals()) this.refusalArrived(refusal);
    for (const root of this.ward.takeBirths()) this.resendUnanswered(root);
    stats.handleMs += performance.now() - started;
    this.schedule();
  }

  handle({ topic, data, retained, historical, browserMs }) {
    stats.messages += 1;
    const used = this.ward.apply(topic, data, { retained, historical, browserMs });
    if (!used) stats.ignored += 1;
    if (!retained && data.kind === 'reading' && this.ward.clock.known) {
      keep(stats.lagMs, this.ward.clock.now(browserMs) - Date.parse(data.received_at));
      keep(stats.browserAgeMs, browserMs - Date.parse(data.received_at));
      if ((data.seq + data.pump_id.length * 7 + data.pump_id.charCodeAt(data.pump_id.length - 1)) % SAMPLE_EVERY === 0) keep(stats.arrivals, [`${data.pump_id}:${data.boot_id}:${data.seq}`, browserMs / 1000]);
    }
  }

  markAllDirty() {
    for (const key of this.ward.pumps.keys()) this.ward.dirty.add(key);
    this.ward.alertsChanged = true;
    this.schedule();
  }

  /** Draw on the next frame when alerts or a gateway changed, else at most every
   * TILE_DRAW_MS: readings come once a second per pump, and redrawing tiles 60 times a
   * second would only cost the browser style, layout and paint work. */
  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    const urgent = this.ward.alertsChanged || this.ward.stationsChanged;
    const wait = urgent ? 0 : Math.max(0, this.lastDrawMs + TILE_DRAW_MS - performance.now());
    if (wait === 0) requestAnimationFrame(() => this.draw());
    else setTimeout(() => requestAnimationFrame(() => this.draw()), wait);
  }

  draw() {
    const started = performance.now();
    this.lastDrawMs = started;
    this.drawWard();
    keep(stats.drawMs, performance.now() - started);
  }

  drawWard() {
    this.scheduled = false;
    stats.frames += 1;
    const ctx = this.ctx();
    for (const key of this.ward.dirty) {
      const pump = this.ward.pumps.get(key);
      if (pump) this.grid.draw(pump, ctx);
      if (pump && this.detail.key === key) this.detail.draw(pump);
    }
    this.ward.dirty.clear();
    const count = String(this.ward.pumps.size);
    if ($('#pump-count').textContent !== count) $('#pump-count').textContent = count;
    if (this.ward.alertsChanged || this.ward.stationsChanged) {
      this.alerts.draw(this.ward, ctx);
      this.ward.alertsChanged = false;
      this.ward.stationsChanged = false;
      this.drawStations();
    }
  }

  drawStations() {
    const parts = [...this.ward.stations.values()].map((s) => `${s.name}: gateway ${s.gatewayState}`);
    $('#gateways').textContent = parts.join(' · ');
    const offline = [...this.ward.stations.values()].some((s) => s.gatewayState === 'offline');
    $('#gateways').dataset.state = offline ? 'offline' : 'online';
  }

  refreshAges() {
    const ctx = this.ctx();
    this.grid.refreshAges(this.ward, ctx);
    this.alerts.refreshTimes(ctx);
  }

  openDetail(key) {
    const pump = this.ward.pumps.get(key);
    if (pump) this.detail.open(pump);
  }

  acknowledge(entry) {
    const id = entry.alert.alert_id;
    if (this.acks.get(id)?.pending || !this.client) return;
    this.sendAck(entry.station.root, id);
    this.alerts.draw(this.ward, this.ctx());
  }

  sendAck(root, id) {
    const timer = setTimeout(() => this.ackTimedOut(id), this.config.ack_timeout_s * 1000);
    this.acks.set(id, { root, pending: true, refused: null, unanswered: false, timer });
    this.client.publishAck(root, this.user, id, (refusal) => {
      if (refusal === null) return; // taken by the broker: now wait for the gateway's receipt
      this.ackRefused(id, refusal);
    });
  }

  /** The fallback when neither the receipt nor the gateway's refusal came (lost, or a
   * gateway that does not publish refusals). */
  ackTimedOut(id) {
    if (this.acks.get(id)?.pending) {
      this.ackRefused(id, `no answer from the gateway within ${this.config.ack_timeout_s} s (not applied)`, true);
    }
  }

  /** The station's gateway (re)connected: an acknowledgement it never answered may have been
   * lost with its previous connection, so send it again (docs/topics.md; a repeat of one it
   * applied is refused as already_acknowledged, after the receipt, and changes nothing). */
  resendUnanswered(root) {
    if (!this.client) return;
    for (const [id, ack] of this.acks) {
      if (ack.root !== root || !(ack.pending || ack.unanswered)) continue;
      if (ack.timer) clearTimeout(ack.timer);
      this.sendAck(root, id);
    }
    this.ward.alertsChanged = true;
    this.schedule();
  }

  /** The gateway's AckRefusal: shown on the row when it is for this user's acknowledgement
   * of that alert on that station, replacing a timeout shown before it came. */
  refusalArrived(refusal) {
    if (!refusalAnswers(refusal, this.acks.get(refusal.alert_id), this.user)) return;
    this.ackRefused(refusal.alert_id, refusalText(refusal));
  }

  ackRefused(id, reason, unanswered = false) {
    const held = this.acks.get(id);
    if (held?.timer) clearTimeout(held.timer);
    this.acks.set(id, { root: held?.root, pending: false, refused: reason, unanswered, timer: null });
    this.ward.alertsChanged = true;
    this.schedule();
  }

  receiptArrived(transition) {
    const held = this.acks.get(transition.alert_id);
    if (held?.timer) clearTimeout(held.timer);
    this.acks.delete(transition.alert_id);
  }
}

async function start() {
  const response = await fetch('config.json', { cache: 'no-store' });
  const config = await response.json();
  $('#scope').textContent = `${config.site} / ${config.station || 'all stations'}`;
  $('#intended-use').textContent = config.intended_use;
  const app = new App(config);
  window.pumpgwDashboard = { stats, ward: app.ward, app };
  $('#login').addEventListener('submit', (event) => {
    event.preventDefault();
    const form = event.target;
    const user = form.elements.user.value.trim();
    const password = form.elements.password.value;
    form.elements.password.value = '';
    app.login(user, password);
  });
  $('#logout').addEventListener('click', () => window.location.reload());
  $('#login button').disabled = false; // enabled only once the form is handled here
}

start();

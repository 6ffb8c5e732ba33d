// Drawing the ward: pump tiles and the alert list. Only what changed is redrawn, at most once
// per animation frame; ages are refreshed once a second.
import { daysToLowAlarm, keyValues, ms, sortedAlerts } from './ward.js';

// IEC 60601-1-8 conveys priority by colour AND another cue; here colour, text and shape.
export const PRIORITY_LOOK = {
  PH: { cls: 'ph', shape: '▲', marks: '!!!', label: 'HIGH' },
  PM: { cls: 'pm', shape: '◆', marks: '!!', label: 'MEDIUM' },
  PL: { cls: 'pl', shape: '●', marks: '!', label: 'LOW' },
  PN: { cls: 'pn', shape: '○', marks: '', label: 'INFO' },
};

export function clockTime(epochMs) {
  if (epochMs === null || epochMs === undefined) return '–';
  return new Date(epochMs).toLocaleTimeString('en-GB', { hour12: false });
}

export function duration(seconds) {
  if (seconds === null || !Number.isFinite(seconds)) return '–';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fixed(value, digits) {
  return typeof value === 'number' && Number.isFinite(value) ? value.toFixed(digits) : '–';
}

/** Pump tiles: one per pump, created once, updated in place. Only tiles on screen are
 * drawn; one that scrolls into view is drawn then (a ward of 1,000 pumps shows ~50). */
export class PumpGrid {
  constructor(container, onOpen) {
    this.container = container;
    this.tiles = new Map();
    this.onOpen = onOpen;
    this.pending = new Map(); // key -> pump, changed while off screen
    this.visible = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const key = entry.target.dataset.key;
        const tile = this.tiles.get(key);
        if (!tile) continue;
        tile.onScreen = entry.isIntersecting;
        const pump = this.pending.get(key);
        if (tile.onScreen && pump && this.lastCtx) {
          this.pending.delete(key);
          this.drawNow(pump, tile, this.lastCtx);
        }
      }
    });
  }

  tile(pump) {
    let tile = this.tiles.get(pump.key);
    if (tile) return tile;
    const root = el('button', 'tile');
    root.type = 'button';
    root.dataset.testid = 'pump';
    root.dataset.pump = pump.id;
    root.dataset.key = pump.key;
    const head = el('div', 'tile-head');
    const id = el('span', 'pump-id', pump.id);
    const drug = el('span', 'drug');
    const badge = el('span', 'badge');
    head.append(id, drug, badge);
    const reservoir = el('div', 'reservoir');
    const rate = el('div', 'rate');
    const telemetry = el('div', 'telemetry');
    root.append(head, reservoir, rate, telemetry);
    root.addEventListener('click', () => this.onOpen(pump.key));
    tile = { root, drug, badge, reservoir, rate, telemetry, onScreen: true, drawn: false };
    this.tiles.set(pump.key, tile);
    this.insertSorted(pump.key, root);
    this.visible.observe(root);
    return tile;
  }

  insertSorted(key, node) {
    let after = null;
    for (const other of this.tiles.keys()) if (other > key && (after === null || other < after)) after = other;
    const before = after === null ? null : this.tiles.get(after).root;
    if (before && before.parentNode === this.container) this.container.insertBefore(node, before);
    else this.container.append(node);
  }

  draw(pump, ctx) {
    const tile = this.tile(pump);
    this.lastCtx = ctx;
    if (!tile.onScreen && tile.drawn) {
      this.pending.set(pump.key, pump);
      return;
    }
    this.drawNow(pump, tile, ctx);
  }

  drawNow(pump, tile, ctx) {
    tile.drawn = true;
    const values = keyValues(pump);
    tile.drug.textContent = values.drug ?? '';
    const days = daysToLowAlarm(values, pump.info);
    tile.reservoir.textContent = values.reservoir_ml === null ? 'no reading yet'
      : `${fixed(values.reservoir_ml, 1)} mL est. · low in ${days === null ? '–' : fixed(days, 1)} d`;
    tile.reservoir.title = 'Reservoir: the pump\'s own estimate from its programmed rate, not a measurement; '
      + 'days until the low-reservoir alarm volume at the programmed rate and maximum boluses';
    const state = values.pump_state && values.pump_state !== 'running' ? ` · ${values.pump_state.toUpperCase()}` : '';
    tile.rate.textContent = `${fixed(values.basal_rate_ml_per_day, 3)} mL/d · batt ${values.battery_state ?? '–'}${state}`;
    const worst = worstAlert(pump);
    const look = worst ? PRIORITY_LOOK[worst.priority] ?? PRIORITY_LOOK.PN : null;
    tile.badge.textContent = look ? `${look.shape} ${look.marks}` : '';
    tile.badge.className = `badge ${look ? look.cls : ''}`;
    tile.badge.title = look ? `${look.label} priority alert` : '';
    this.drawAge(pump, tile, ctx);
  }

  drawAge(pump, tile, ctx) {
    const { station } = pump;
    const lost = pump.status?.telemetry === 'lost';
    const offline = station.gatewayState === 'offline';
    const lastMs = pump.readingMs ?? ms(pump.status?.at);
    const what = pump.readingMs === null ? 'status' : 'reading';
    const age = lastMs === null ? null : (ctx.gatewayNowMs - lastMs) / 1000;
    let text;
    if (offline) {
      text = `gateway offline since ${station.offlineRetained ? '≤ ' : ''}${clockTime(station.offlineSinceMs)}`;
    } else if (ctx.brokerLostSinceMs !== null) {
      text = `stale since ${clockTime(ctx.brokerLostSinceMs)}`;
    } else if (lost) {
      text = `telemetry LOST · ${duration(age)} ago`;
    } else if (!ctx.clockKnown) {
      // No live message yet to tell the gateway's clock from the browser's: a time, no age.
      text = `${pump.status?.telemetry ?? '–'} · ${lastMs === null ? 'no reading' : `${what} at ${clockTime(lastMs)}`}`;
    } else {
      text = `${pump.status?.telemetry ?? '–'} · ${age === null ? 'no reading' : `${what} ${duration(age)} ago`}`;
      tile.telemetry.title = `telemetry ${pump.status?.telemetry ?? 'unknown'}; age of the last ${what} on the gateway's clock`;
    }
    tile.telemetry.textContent = text;
    tile.root.classList.toggle('offline', offline);
    tile.root.classList.toggle('stale', offline || ctx.brokerLostSinceMs !== null);
    tile.root.classList.toggle('lost', lost);
    tile.root.dataset.state = offline ? 'gateway-offline' : (ctx.brokerLostSinceMs !== null ? 'stale' : (lost ? 'telemetry-lost' : 'live'));
  }

  refreshAges(ward, ctx) {
    this.lastCtx = ctx;
    for (const pump of ward.pumps.values()) {
      const tile = this.tiles.get(pump.key);
      if (!tile) continue;
      if (tile.onScreen) this.drawAge(pump, tile, ctx);
      else this.pending.set(pump.key, pump);
    }
  }
}

function worstAlert(pump) {
  let worst = null;
  const order = { PH: 0, PM: 1, PL: 2, PN: 3 };
  for (const alert of pump.alerts.values()) {
    if (!worst || (order[alert.priority] ?? 9) < (order[worst.priority] ?? 9)) worst = alert;
  }
  return worst;
}

function metaText(alert, ctx) {
  const startMs = ms(alert.started_at);
  const when = clockTime(startMs);
  const since = alert.start_known ? `since ${when}` : `changed ${when}`;
  if (!ctx.clockKnown) return `${since} · ${alert.phase}`;
  const age = startMs === null ? null : (ctx.gatewayNowMs - startMs) / 1000;
  return `${since} · ${alert.start_known ? '' : '≥ '}${duration(age)} · ${alert.phase}`;
}

/** The alert list, highest priority first; rebuilt when the set of alerts changes. */
export class AlertList {
  constructor(container, counter, actions) {
    this.container = container;
    this.counter = counter;
    this.actions = actions; // { ack(entry), ackState(alertId), canAck() }
    this.rows = [];
  }

  draw(ward, ctx) {
    const entries = sortedAlerts(ward);
    this.counter.textContent = String(entries.length);
    this.metas = [];
    const items = entries.map((entry) => this.item(entry, ctx));
    this.container.replaceChildren(...items);
    if (entries.length === 0) this.container.append(el('li', 'none', 'No active alerts'));
  }

  item(entry, ctx) {
    const { alert } = entry;
    const look = PRIORITY_LOOK[alert.priority] ?? PRIORITY_LOOK.PN;
    const acked = alert.inactivation === 'alert-acknowledged';
    const offline = entry.station.gatewayState === 'offline';
    const li = el('li', `alert ${look.cls} ${acked ? 'acked' : 'unacked'}${offline ? ' stale' : ''}`);
    li.dataset.testid = 'alert';
    li.dataset.alertId = alert.alert_id;
    li.dataset.priority = alert.priority;
    li.dataset.acknowledged = String(acked);
    const prio = el('span', 'prio', `${look.shape} ${look.marks} ${look.label}`);
    prio.setAttribute('aria-label', `${look.label} priority`);
    const who = el('span', 'who', entry.pumpKey ? alert.pump_id : 'gateway');
    const text = el('span', 'text', alert.text);
    text.title = alert.text;
    const meta = el('span', 'meta', metaText(alert, ctx));
    meta.title = `start time (or last change when the start was before the page opened), duration, ACM phase; type ${alert.alert_type}`;
    this.metas.push({ meta, alert });
    const [action, status] = this.ackParts(entry, acked, offline);
    // The second line holds the alert text and, after it, the acknowledgement's receipt (or
    // its pending or refused state): two lines an alert, acknowledged or not, on a desktop.
    const line = el('span', 'line');
    line.append(text);
    if (status.childNodes.length || status.textContent) {
      status.title = status.textContent; // cut short on a desktop: the whole of it on hover
      line.append(status);
    }
    li.append(prio, who, meta, action, line);
    return li;
  }

  /** Once a second: only the durations change. */
  refreshTimes(ctx) {
    for (const { meta, alert } of this.metas ?? []) meta.textContent = metaText(alert, ctx);
  }

  /** [the action in the first line, the status after the text in the second] */
  ackParts(entry, acked, offline) {
    const { alert } = entry;
    const action = el('span', 'ack-action');
    const status = el('span', 'ack-status');
    if (acked) {
      // Who and when stay whole; the reminder after them is what an ellipsis may cut.
      status.classList.add('receipt');
      status.append(
        el('span', 'receipt-who', `✓ acknowledged by ${alert.acknowledged_by ?? '?'} at ${clockTime(ms(alert.acknowledged_at))}`),
        el('span', 'receipt-note', '; the pump alarms until resolved at the pump'),
      );
      return [action, status];
    }
    const state = this.actions.ackState(alert.alert_id);
    if (state?.pending) {
      status.append(el('span', 'pending', 'acknowledgement sent; waiting for the gateway\'s receipt…'));
      return [action, status];
    }
    if (this.actions.canAck()) {
      const button = el('button', 'ack-button', 'Acknowledge');
      button.type = 'button';
      button.disabled = offline;
      button.title = offline ? 'The gateway is offline' : 'Record that you have seen this alert (does not silence the pump)';
      button.addEventListener('click', () => this.actions.ack(entry));
      action.append(button);
    }
    if (state?.refused) {
      const refused = el('span', 'refused', `acknowledgement refused: ${state.refused}`);
      refused.dataset.testid = 'ack-refused';
      status.append(refused);
    }
    return [action, status];
  }
}

// One pump in detail: reservoir and rate trend since the page opened (uPlot), its recent
// events and alert transitions, and its programming (the retained `info`).
import uPlot from 'uplot';
import { trendSeries } from './ward.js';
import { clockTime } from './view.js';

const CHART_HEIGHT_PX = 180;

function row(list, label, value) {
  const dt = document.createElement('dt');
  dt.textContent = label;
  const dd = document.createElement('dd');
  dd.textContent = value ?? '–';
  list.append(dt, dd);
}

export class PumpDetail {
  constructor(dialog) {
    this.dialog = dialog;
    this.key = null;
    this.chart = null;
    dialog.querySelector('[data-role=close]').addEventListener('click', () => this.close());
    dialog.addEventListener('close', () => this.close());
  }

  open(pump) {
    this.key = pump.key;
    this.dialog.querySelector('[data-role=title]').textContent = `Pump ${pump.id}`;
    if (!this.dialog.open) this.dialog.showModal();
    this.draw(pump);
  }

  close() {
    this.key = null;
    this.chart?.destroy();
    this.chart = null;
    if (this.dialog.open) this.dialog.close();
  }

  draw(pump) {
    if (this.key !== pump.key) return;
    this.drawChart(pump);
    this.drawInfo(pump);
    this.drawHistory(pump);
  }

  drawChart(pump) {
    const data = trendSeries(pump.trend);
    if (this.chart) { this.chart.setData(data); return; }
    const holder = this.dialog.querySelector('[data-role=chart]');
    holder.replaceChildren();
    const width = Math.max(280, Math.min(640, holder.clientWidth || 600));
    this.chart = new uPlot({
      width, height: CHART_HEIGHT_PX,
      series: [{}, { label: 'reservoir (mL, est.)', stroke: '#2563eb', scale: 'mL' },
        { label: 'rate (mL/day)', stroke: '#b45309', scale: 'rate' }],
      axes: [{}, { scale: 'mL', label: 'mL' }, { scale: 'rate', side: 1, label: 'mL/day', grid: { show: false } }],
    }, data, holder);
  }

  drawInfo(pump) {
    const list = this.dialog.querySelector('[data-role=info]');
    list.replaceChildren();
    const { info } = pump;
    if (!info) { row(list, 'programming', 'not received yet'); return; }
    row(list, 'model', `${info.model} (serial ${info.serial}, firmware ${info.firmware})`);
    row(list, 'drug', `${info.drug}, ${info.concentration_mg_per_ml} mg/mL`);
    row(list, 'reservoir capacity', `${info.reservoir_capacity_ml} mL`);
    const p = info.prescription ?? {};
    row(list, 'basal rate', `${p.basal_rate_ml_per_day} mL/day`);
    row(list, 'bolus', `${p.bolus_dose_ml} mL, lockout ${p.bolus_lockout_min} min, at most ${p.boluses_per_day_max}/day`);
    row(list, 'low-reservoir alarm', `${p.low_reservoir_alarm_ml} mL`);
  }

  drawHistory(pump) {
    const active = this.dialog.querySelector('[data-role=active]');
    active.replaceChildren(...[...pump.alerts.values()].map((a) => {
      const li = document.createElement('li');
      li.textContent = `${a.priority} ${a.text} (${a.phase}${a.acknowledged_by ? `, acknowledged by ${a.acknowledged_by}` : ''})`;
      return li;
    }));
    if (pump.alerts.size === 0) {
      const li = document.createElement('li');
      li.textContent = 'none';
      active.append(li);
    }
    const list = this.dialog.querySelector('[data-role=history]');
    const items = [
      ...pump.events.map((e) => ({ at: e.received_at, text: `event ${e.event}${e.bolus_ml ? ` ${e.bolus_ml} mL` : ''}` })),
      ...pump.alertHistory.map((a) => ({ at: a.at, text: `${a.priority} ${a.alert_kind}: ${a.phase}${a.acknowledged_by ? ` by ${a.acknowledged_by}` : ''}` })),
    ].sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
    list.replaceChildren(...items.map((item) => {
      const li = document.createElement('li');
      li.textContent = `${clockTime(Date.parse(item.at))} ${item.text}`;
      return li;
    }));
    if (items.length === 0) {
      const li = document.createElement('li');
      li.textContent = 'nothing since the page opened';
      list.append(li);
    }
  }
}

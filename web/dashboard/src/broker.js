// The page's side of the broker connection: commands to worker.js, events back from it.

export class Broker {
  /** `on`: connected(), lost(), refused(reason), problem(reason), messages(batch, ignored). */
  constructor(on) {
    this.on = on;
    this.ackDone = new Map();
    this.worker = new Worker('worker.js');
    this.worker.onmessage = ({ data: event }) => this.dispatch(event);
  }

  dispatch(event) {
    switch (event.type) {
      case 'messages': this.on.messages(event.batch, event.ignored); break;
      case 'connected': this.on.connected(); break;
      case 'lost': this.on.lost(); break;
      case 'refused': this.on.refused(event.reason); break;
      case 'problem': this.on.problem(event.reason); break;
      case 'ack-result': {
        const done = this.ackDone.get(event.alertId);
        this.ackDone.delete(event.alertId);
        done?.(event.refusal);
        break;
      }
      default: break;
    }
  }

  /** Stop the worker and its connection (after a refused login). */
  close() {
    this.worker.terminate();
  }

  connect(config, user, password) {
    this.worker.postMessage({ type: 'connect', config, user, password });
  }

  /** `done(null)` when the broker took it, else the refusal's reason. */
  publishAck(root, user, alertId, done) {
    this.ackDone.set(alertId, done);
    this.worker.postMessage({ type: 'ack', root, user, alertId });
  }
}

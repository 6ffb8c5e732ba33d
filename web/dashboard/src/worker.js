// The broker connection off the main thread: MQTT.js and JSON parsing run here, and the
// page gets the decoded messages in batches (one postMessage per batch), so a burst of
// readings never blocks drawing or clicks. The credentials arrive by postMessage and stay in
// this worker's memory.
import { connect, publishAck } from './connection.js';

const BATCH_MS = 16; // about one frame
const BATCH_MAX = 2000;
const decoder = new TextDecoder();

let client = null;
let batch = [];
let ignored = 0;
let timer = null;

function flush() {
  timer = null;
  if (batch.length === 0 && ignored === 0) return;
  postMessage({ type: 'messages', batch, ignored });
  batch = [];
  ignored = 0;
}

function queue(topic, payload, packet) {
  let data;
  try { data = JSON.parse(decoder.decode(payload)); } catch { ignored += 1; return; }
  const props = packet.properties?.userProperties ?? {};
  batch.push({ topic, data, retained: packet.retain, historical: props.historical === 'true',
    browserMs: Date.now() });
  if (batch.length >= BATCH_MAX) flush();
  else if (timer === null) timer = setTimeout(flush, BATCH_MS);
}

const events = {
  connected: () => { flush(); postMessage({ type: 'connected' }); },
  lost: () => { flush(); postMessage({ type: 'lost' }); },
  refused: (reason) => { client = null; postMessage({ type: 'refused', reason }); },
  problem: (reason) => postMessage({ type: 'problem', reason }),
  message: queue,
};

onmessage = ({ data: command }) => {
  if (command.type === 'connect') {
    client = connect(command.config, command.user, command.password, events);
  } else if (command.type === 'ack' && client) {
    publishAck(client, command.root, command.user, command.alertId,
      (refusal) => postMessage({ type: 'ack-result', alertId: command.alertId, refusal }));
  } else if (command.type === 'ack') {
    postMessage({ type: 'ack-result', alertId: command.alertId, refusal: 'not connected to the broker' });
  }
};

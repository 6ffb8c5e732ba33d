// The one build: bundles src/ into the Python package's static folder.
// `npm ci && npm run build` (or `node build.mjs --outdir DIR` to build elsewhere, which the
// drift test does and compares with what is committed).
import { build } from 'esbuild';
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const flag = process.argv.indexOf('--outdir');
const outdir = resolve(flag > 0 ? process.argv[flag + 1] : join(here, '../../gateway/dashboard/static'));
mkdirSync(outdir, { recursive: true });

const common = {
  outdir,
  bundle: true,
  minify: true,
  platform: 'browser',
  target: ['chrome110', 'firefox110', 'safari16'],
  legalComments: 'linked',
  logLevel: 'warning',
};
await build({ ...common, entryPoints: { app: join(here, 'src/main.js') }, format: 'esm' });
// MQTT.js runs in a classic worker (src/worker.js), off the page's main thread.
await build({ ...common, entryPoints: { worker: join(here, 'src/worker.js') }, format: 'iife' });
copyFileSync(join(here, 'src/index.html'), join(outdir, 'index.html'));

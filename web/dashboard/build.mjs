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

await build({
  entryPoints: { app: join(here, 'src/main.js') },
  outdir,
  bundle: true,
  minify: true,
  format: 'esm',
  platform: 'browser',
  target: ['chrome110', 'firefox110', 'safari16'],
  legalComments: 'linked',
  logLevel: 'warning',
});
copyFileSync(join(here, 'src/index.html'), join(outdir, 'index.html'));

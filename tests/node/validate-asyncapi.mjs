// Validate an AsyncAPI document with the AsyncAPI project's own parser (@asyncapi/parser).
//
//   node validate-asyncapi.mjs FILE
//
// Prints every diagnostic as `severity code path: message`, then a summary line. Exits 0 only
// when the document parses and has no errors and no warnings; 1 otherwise; 2 on bad usage.
import { readFile } from 'node:fs/promises';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const SEVERITY_NAMES = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};
const FAILING = new Set([DiagnosticSeverity.Error, DiagnosticSeverity.Warning]);

function describe(diagnostic) {
  const where = diagnostic.path.length ? `/${diagnostic.path.join('/')}` : '(document)';
  const severity = SEVERITY_NAMES[diagnostic.severity] ?? String(diagnostic.severity);
  return `${severity} ${diagnostic.code} ${where}: ${diagnostic.message}`;
}

async function main(argv) {
  if (argv.length !== 1) {
    console.error('usage: node validate-asyncapi.mjs FILE');
    return 2;
  }
  const [file] = argv;
  const text = await readFile(file, 'utf8');
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(text, { source: file });
  for (const diagnostic of diagnostics) {
    console.log(describe(diagnostic));
  }
  const failing = diagnostics.filter((d) => FAILING.has(d.severity));
  if (document === undefined || failing.length > 0) {
    console.log(`${file}: INVALID (${failing.length} errors and warnings)`);
    return 1;
  }
  const version = document.version();
  const channels = document.channels().length;
  const operations = document.operations().length;
  const messages = document.allMessages().length;
  console.log(
    `${file}: valid AsyncAPI ${version}: ${channels} channels, ${operations} operations, ` +
      `${messages} messages`,
  );
  return 0;
}

process.exitCode = await main(process.argv.slice(2));

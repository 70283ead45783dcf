// Validates AsyncAPI documents with the official parser (@asyncapi/parser): every diagnostic
// of severity error fails; warnings are printed. Usage (NODE_PATH names the parser's
// node_modules, as scripts/test.sh sets it):
//   node scripts/validate-asyncapi.mjs contracts/asyncapi.yaml [more.yaml ...]
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH ?? ".", "noop.js"));
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");

const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"), { source: path.resolve(file) });
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  for (const d of diagnostics) {
    const level = d.severity === DiagnosticSeverity.Error ? "error" : "warning";
    console.log(`${file}: ${level} ${d.code} at /${d.path.join("/")}: ${d.message}`);
  }
  if (!document || errors.length > 0) {
    failed = true;
    console.log(`${file}: INVALID (${errors.length} error(s))`);
  } else {
    const messages = document.allMessages().length;
    const channels = document.allChannels().length;
    console.log(`${file}: valid AsyncAPI ${document.version()} (${channels} channels, ${messages} messages)`);
  }
}
process.exit(failed ? 1 : 0);

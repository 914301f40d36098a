// Validates cert-manager Certificates and Issuers against cert-manager's published CRD schemas,
// as compiled by @kubernetes-models/cert-manager (pinned in package.json, installed by
// scripts/install_tools.py). Usage: node validate.mjs MODELS_DIR < docs.json
// (a JSON array of manifests); prints one line per document, exits 1 if any is invalid.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const models = join(process.argv[2], "node_modules", "@kubernetes-models", "cert-manager", "cert-manager.io", "v1");
const load = async (kind) => (await import(pathToFileURL(join(models, `${kind}.js`)).href))[kind];
const kinds = { Certificate: await load("Certificate"), Issuer: await load("Issuer"), ClusterIssuer: await load("ClusterIssuer") };

let input = "";
for await (const chunk of process.stdin) input += chunk;
let invalid = 0;
for (const doc of JSON.parse(input)) {
  const name = `${doc.kind} ${doc.metadata?.name}`;
  const Model = kinds[doc.kind];
  if (!Model) {
    invalid++;
    console.log(`INVALID ${name}: not a cert-manager kind this checks`);
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`valid ${name}`);
  } catch (error) {
    invalid++;
    console.log(`INVALID ${name}: ${error.message}`);
  }
}
process.exit(invalid ? 1 : 0);

// Build a JavaScript plugin into a component with componentize-js.
//
//   node sdk/js/build.mjs <plugin dir> <wit dir> <world> <out.wasm>
//
// The plugin dir holds `app.js` (the entry point) and any modules it imports
// by relative path; `refract-sdk.js` is copied next to them. componentize-js
// is resolved from $REFRACT_JS_TOOLCHAIN (a directory with node_modules; see
// scripts/install-tools), else from this directory's node_modules.

import { cp, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const [dir, wit, world, out] = process.argv.slice(2);
if (!out) {
  console.error('usage: node build.mjs <plugin dir> <wit dir> <world> <out.wasm>');
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const toolchain = process.env.REFRACT_JS_TOOLCHAIN ?? here;
let componentize;
try {
  // The package is ESM-only: resolve its `import` entry by hand.
  const pkg = join(resolve(toolchain), 'node_modules', '@bytecodealliance', 'componentize-js');
  const { exports } = JSON.parse(await readFile(join(pkg, 'package.json'), 'utf8'));
  ({ componentize } = await import(pathToFileURL(join(pkg, exports.import)).href));
} catch (e) {
  console.error(
    `componentize-js is not installed in ${toolchain}: run scripts/install-tools, or ` +
      `npm install --prefix ${toolchain} @bytecodealliance/componentize-js@0.23.0 (${e.message})`,
  );
  process.exit(3);
}

// Sources and the SDK in one directory, which componentize-js embeds.
const work = await mkdtemp(join(tmpdir(), 'refract-js-'));
try {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    // Linked modules (shared between plugins) are copied as files.
    if ((entry.isFile() || entry.isSymbolicLink()) && entry.name.endsWith('.js')) {
      await cp(join(dir, entry.name), join(work, entry.name), { dereference: true });
    }
  }
  // The enricher world imports no `search` or `emit`: give the SDK stand-ins
  // that say so instead of imports componentize-js could not resolve.
  let sdk = await readFile(join(here, 'refract-sdk.js'), 'utf8');
  if (world.endsWith('/enricher')) {
    for (const [name, iface] of [['search', 'search'], ['emitter', 'emit']]) {
      const line = `import * as ${name} from 'refract:plugin/${iface}@0.1.1';`;
      if (!sdk.includes(line)) throw new Error(`refract-sdk.js no longer has: ${line}`);
      const stand_in = `const ${name} = new Proxy({}, { get: () => () => { throw new Error('${iface} is not available to enrichers'); } });`;
      sdk = sdk.replace(line, stand_in);
    }
  }
  await writeFile(join(work, 'refract-sdk.js'), sdk);
  // A projection's exports, with `keyedTables` (WIT 0.1.1) taken from its
  // manifest when app.js does not export it, so sources written before it
  // build unchanged.
  let entry = 'app.js';
  if (!world.endsWith('/enricher')) {
    entry = '__refract_entry.js';
    await writeFile(
      join(work, entry),
      [
        "import * as app from './app.js';",
        'export const manifest = app.manifest;',
        'export const handle = app.handle;',
        'export const indexes = app.indexes ?? (() => []);',
        'export const keyedTables = app.keyedTables ?? (() => app.manifest().keyedTables ?? []);',
        '',
      ].join('\n'),
    );
  }
  const { component } = await componentize({
    sourcePath: join(work, entry),
    witPath: resolve(wit),
    worldName: world,
    disableFeatures: ['http', 'fetch-event'],
  });
  await writeFile(out, component);
} finally {
  await rm(work, { recursive: true, force: true });
}

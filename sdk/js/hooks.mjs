// Module resolution hooks for testing.mjs.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const here = new URL('./', import.meta.url);

export async function resolve(specifier, context, next) {
  const wit = /^refract:plugin\/([a-z-]+)@0\.1\.[0-9]+$/.exec(specifier);
  if (wit) return { url: new URL(`host/${wit[1]}.mjs`, here).href, shortCircuit: true };
  if (specifier === './refract-sdk.js' && context.parentURL) {
    const local = new URL(specifier, context.parentURL);
    if (!existsSync(fileURLToPath(local))) return { url: new URL('refract-sdk.js', here).href, shortCircuit: true };
  }
  return next(specifier, context);
}

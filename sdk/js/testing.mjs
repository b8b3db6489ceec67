// Run JavaScript plugins under Node for their unit tests:
//   node --import ./.refract/sdk/js/testing.mjs --test
// The `refract:plugin/*` imports resolve to in-memory stand-ins (memory.mjs),
// and a plugin's `./refract-sdk.js` to this SDK when the file is not there.
import { register } from 'node:module';

register('./hooks.mjs', import.meta.url);

// {{name}}: a Refract projection. It counts the events of each type on the
// `orders` stream; change the manifest and apply() to build your read model.

import { Manifest, Table, projection } from './refract-sdk.js';

const COUNTS = new Table('counts');

export const { manifest, handle, indexes } = projection({
  manifest: new Manifest('{{name}}', '0.1.0').subscribe('orders').table(COUNTS),
  apply(event) {
    event.json(); // data that is not JSON becomes a dead letter
    const count = COUNTS.get(event.eventType) ?? { n: 0, last: 0 };
    count.n += 1;
    count.last = event.time;
    COUNTS.put(event.eventType, count);
  },
});

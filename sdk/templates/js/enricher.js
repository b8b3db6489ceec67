// {{name}}: a Refract enricher. It reads OrderPlaced from `orders` and emits
// LargeOrderPlaced for orders whose total reaches the `threshold` setting
// (default 100); route its output in refract.yaml (plugins.{{name}}.routes),
// else it goes to the stream `{{name}}`.

import { Manifest, NewEvent, enricher, setting } from './refract-sdk.js';

export const { manifest, enrich } = enricher({
  manifest: new Manifest('{{name}}', '0.1.0').subscribe('orders', ['OrderPlaced']),
  enrichOne(event) {
    const order = event.json();
    const threshold = Number(setting('threshold', '100'));
    return Number(order.total ?? 0) >= threshold ? [new NewEvent('LargeOrderPlaced', order).derivedFrom(event)] : [];
  },
});

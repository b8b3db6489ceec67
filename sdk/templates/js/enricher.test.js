// Run with: node --import ./.refract/sdk/js/testing.mjs --test
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { event, reset } from './.refract/sdk/js/memory.mjs';
import { enrich } from './app.js';

beforeEach(reset);

test('only large orders pass', () => {
  const out = enrich([
    event('orders', 'OrderPlaced', { orderId: 'o-1', total: 250 }, { key: 'o-1' }),
    event('orders', 'OrderPlaced', { orderId: 'o-2', total: 20 }, { key: 'o-2' }),
  ]);
  assert.deepEqual(out.map((o) => [o.eventType, o.key]), [['LargeOrderPlaced', 'o-1']]);
});

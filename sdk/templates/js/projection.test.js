// Run with: node --import ./.refract/sdk/js/testing.mjs --test
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { event, memory, reset } from './.refract/sdk/js/memory.mjs';
import { handle } from './app.js';

beforeEach(reset);

test('counts events by type', () => {
  handle([event('orders', 'OrderPlaced', { orderId: 'o-1' }), event('orders', 'OrderPlaced', { orderId: 'o-2' })]);
  assert.deepEqual(memory.get('counts', 'OrderPlaced'), { n: 2, last: 0 });
});

test('data that is not JSON is rejected', () => {
  assert.throws(() => handle([event('orders', 'OrderPlaced', 'not json')]), (e) => e.tag === 'rejected');
});

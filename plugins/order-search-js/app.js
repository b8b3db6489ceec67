// order-search in JavaScript: the same table and search documents as the Rust plugin.
//
// The seed's Elasticsearch `order_projection` mapping: index `orders` with
// `orderId`, `customer` and `status` as keywords, `total` and `paid` as f64,
// `updatedAt` as a date, `description` and `items` as text. The order's
// state lives in the `orders` table; every change re-indexes its document.

import { EVENT_TYPES, nextOrder } from './order-events.js';
import { Index, IndexMapping, Manifest, Table, f64, projection } from './refract-sdk.js';

const ORDERS = new Table('orders');
const ORDER_INDEX = new Index('orders');

export const { manifest, handle, indexes } = projection({
  manifest: new Manifest('order-search', '0.1.0').subscribe('orders', EVENT_TYPES).table(ORDERS),
  indexes: [
    new IndexMapping('orders')
      .keyword('orderId').keyword('customer').keyword('status')
      .f64('total').f64('paid').date('updatedAt').text('description').text('items'),
  ],

  apply(event) {
    const order = nextOrder(event, ORDERS, (change) => ({ description: change.description, items: change.items.join(' ') }));
    ORDER_INDEX.upsert(order.orderId, {
      orderId: order.orderId, customer: order.customerId, status: order.status, total: f64(order.total),
      paid: f64(order.paid), updatedAt: order.updatedAt, description: order.description, items: order.items,
    });
    ORDERS.put(order.orderId, { ...order, total: f64(order.total), paid: f64(order.paid) });
  },
});

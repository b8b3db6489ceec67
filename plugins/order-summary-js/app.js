// order-summary in JavaScript: the same read model as the Rust plugin, byte for byte.
//
// Reads OrderPlaced, PaymentReceived, OrderShipped and OrderCancelled from
// the `orders` stream and maintains `orders` (order id → order) and
// `customer-orders` (`<customerId>/<orderId>` → status and total), with the
// rules of order-events.js.

import { EVENT_TYPES, nextOrder } from './order-events.js';
import { Manifest, Table, f64, projection } from './refract-sdk.js';

const ORDERS = new Table('orders');
const CUSTOMER_ORDERS = new Table('customer-orders');

export const { manifest, handle, indexes } = projection({
  manifest: new Manifest('order-summary', '0.1.0').subscribe('orders', EVENT_TYPES).keyedTable(ORDERS).table(CUSTOMER_ORDERS),

  apply(event) {
    const order = nextOrder(event, ORDERS);
    // f64(): written as floats (`10.0`), as the Rust plugin writes them.
    CUSTOMER_ORDERS.put(`${order.customerId}/${order.orderId}`, { orderId: order.orderId, status: order.status, total: f64(order.total) });
    ORDERS.put(order.orderId, { ...order, total: f64(order.total), paid: f64(order.paid) });
  },
});

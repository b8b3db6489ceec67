// order-summary in JavaScript: the same read model as the Rust plugin, byte for byte.
//
// Reads OrderPlaced, PaymentReceived, OrderShipped and OrderCancelled from
// the `orders` stream and maintains `orders` (order id → order) and
// `customer-orders` (`<customerId>/<orderId>` → status and total). Amounts
// are summed in whole cents; `cancelled` is final; events for unknown
// orders, a second OrderPlaced and data that does not decode are rejected.

import { Manifest, Rejected, Table, cents, f64, projection } from './refract-sdk.js';

const EVENT_TYPES = ['OrderPlaced', 'PaymentReceived', 'OrderShipped', 'OrderCancelled'];
const ORDERS = new Table('orders');
const CUSTOMER_ORDERS = new Table('customer-orders');

/** `value[name]`, which must be a string or a number (the Rust plugin's serde types). */
function field(event, value, name, kind) {
  const where = `${event.eventType} at ${event.stream}/${event.partition}@${event.offset}: data does not decode`;
  if (value === null || typeof value !== 'object' || Array.isArray(value) || !(name in value)) {
    throw new Rejected(`${where}: missing field \`${name}\``);
  }
  const v = value[name];
  if (typeof v !== kind) throw new Rejected(`${where}: invalid type for \`${name}\``);
  return v;
}

/** An order as stored: floats marked so that they are written as the Rust plugin writes them. */
const stored = (o) => ({
  orderId: o.orderId,
  customerId: o.customerId,
  status: o.status,
  total: f64(o.total),
  paid: f64(o.paid),
  updatedAt: o.updatedAt,
});

export const { manifest, handle, indexes } = projection({
  manifest: new Manifest('order-summary', '0.1.0').subscribe('orders', EVENT_TYPES).table(ORDERS).table(CUSTOMER_ORDERS),

  apply(event) {
    const d = event.json();
    let order;
    if (event.eventType === 'OrderPlaced') {
      const orderId = field(event, d, 'orderId', 'string');
      const customerId = field(event, d, 'customerId', 'string');
      const total = field(event, d, 'total', 'number');
      const items = d.items ?? [];
      for (const item of Array.isArray(items) ? items : [null]) field(event, item, 'sku', 'string');
      if ('description' in d && typeof d.description !== 'string') field(event, d, 'description', 'string');
      if (ORDERS.get(orderId) !== undefined) throw new Rejected(`order ${orderId} was already placed`);
      order = { orderId, customerId, status: 'placed', total, paid: 0, updatedAt: event.time };
    } else if (EVENT_TYPES.includes(event.eventType)) {
      const orderId = field(event, d, 'orderId', 'string');
      const amount = event.eventType === 'PaymentReceived' ? field(event, d, 'amount', 'number') : 0;
      order = ORDERS.get(orderId);
      if (order === undefined) throw new Rejected(`${event.eventType} for unknown order ${orderId}`);
      if (order.status !== 'cancelled') {
        if (event.eventType === 'PaymentReceived') {
          const paid = cents(order.paid) + cents(amount);
          order.paid = paid / 100;
          if (order.status === 'placed' && paid >= cents(order.total)) order.status = 'paid';
        } else if (event.eventType === 'OrderShipped') {
          order.status = 'shipped';
        } else {
          order.status = 'cancelled';
        }
      }
      order.updatedAt = event.time;
    } else {
      throw new Rejected(`unexpected event type ${event.eventType}`);
    }
    CUSTOMER_ORDERS.put(`${order.customerId}/${order.orderId}`, {
      orderId: order.orderId,
      status: order.status,
      total: f64(order.total),
    });
    ORDERS.put(order.orderId, stored(order));
  },
});

// The order events of the examples and the rules that move an order's
// status, in JavaScript: the same as the Rust crate `order-events`, so that
// the JavaScript order plugins build the same read models as the Rust ones.
//
// Plugins link this file into their directory (a symbolic link), since a
// plugin builds from its own directory.

import { Rejected, cents } from './refract-sdk.js';

export const EVENT_TYPES = ['OrderPlaced', 'PaymentReceived', 'OrderShipped', 'OrderCancelled'];

/** `value[name]`, which must be of type `kind` (the Rust plugins' serde types). */
function field(event, value, name, kind) {
  const where = `${event.eventType} at ${event.stream}/${event.partition}@${event.offset}: data does not decode`;
  if (value === null || typeof value !== 'object' || Array.isArray(value) || !(name in value)) {
    throw new Rejected(`${where}: missing field \`${name}\``);
  }
  if (typeof value[name] !== kind) throw new Rejected(`${where}: invalid type for \`${name}\``);
  return value[name];
}

/** The event's data, checked as the Rust plugins' serde types check it. */
export function decode(event) {
  const d = event.json();
  if (!EVENT_TYPES.includes(event.eventType)) throw new Rejected(`unexpected event type ${event.eventType}`);
  const decoded = { orderId: field(event, d, 'orderId', 'string') };
  if (event.eventType === 'OrderPlaced') {
    decoded.customerId = field(event, d, 'customerId', 'string');
    decoded.total = field(event, d, 'total', 'number');
    const items = d.items ?? [];
    decoded.items = (Array.isArray(items) ? items : [null]).map((item) => field(event, item, 'sku', 'string'));
    decoded.description = 'description' in d ? field(event, d, 'description', 'string') : '';
  } else if (event.eventType === 'PaymentReceived') {
    decoded.amount = field(event, d, 'amount', 'number');
  }
  return decoded;
}

/** Apply a payment, shipment or cancellation to `order`; `cancelled` is final. */
export function advance(order, kind, change) {
  if (order.status === 'cancelled') return;
  if (kind === 'PaymentReceived') {
    const paid = cents(order.paid) + cents(change.amount);
    order.paid = paid / 100;
    if (order.status === 'placed' && paid >= cents(order.total)) order.status = 'paid';
  } else if (kind === 'OrderShipped') {
    order.status = 'shipped';
  } else if (kind === 'OrderCancelled') {
    order.status = 'cancelled';
  }
}

export const unknownOrder = (kind, orderId) => new Rejected(`${kind} for unknown order ${orderId}`);
export const alreadyPlaced = (orderId) => new Rejected(`order ${orderId} was already placed`);

/**
 * The order as `event` leaves it, read from and checked against the `orders`
 * table: a new one for OrderPlaced (plus `extra(change)` fields), else the
 * stored one advanced. `updatedAt` is the event's time.
 */
export function nextOrder(event, orders, extra = () => ({})) {
  const change = decode(event);
  if (event.eventType === 'OrderPlaced') {
    if (orders.get(change.orderId) !== undefined) throw alreadyPlaced(change.orderId);
    return {
      orderId: change.orderId, customerId: change.customerId, status: 'placed', total: change.total, paid: 0,
      updatedAt: event.time, ...extra(change),
    };
  }
  const order = orders.get(change.orderId);
  if (order === undefined) throw unknownOrder(event.eventType, change.orderId);
  advance(order, event.eventType, change);
  order.updatedAt = event.time;
  return order;
}

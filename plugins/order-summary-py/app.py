"""order-summary in Python: the same read model as the Rust plugin, byte for byte.

Reads OrderPlaced, PaymentReceived, OrderShipped and OrderCancelled from the
`orders` stream and maintains `orders` (order id → order) and
`customer-orders` (`<customerId>/<orderId>` → status and total), with the
rules of `order_events` (amounts in whole cents, `cancelled` final; unknown
orders, a second OrderPlaced and data that does not decode are rejected).
"""

import order_events
from refract_sdk import Manifest, Projection, Table

ORDERS = Table("orders")
CUSTOMER_ORDERS = Table("customer-orders")


class WitWorld(Projection):
    MANIFEST = (Manifest("order-summary", "0.1.0")
                .subscribe("orders", order_events.EVENT_TYPES)
                .keyed_table(ORDERS)
                .table(CUSTOMER_ORDERS))

    def apply(self, event):
        order = order_events.next_order(event, ORDERS)
        entry = {"orderId": order["orderId"], "status": order["status"], "total": order["total"]}
        CUSTOMER_ORDERS.put(f"{order['customerId']}/{order['orderId']}", entry)
        ORDERS.put(order["orderId"], order)

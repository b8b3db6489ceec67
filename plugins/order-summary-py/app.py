"""order-summary in Python: the same read model as the Rust plugin, byte for byte.

Reads OrderPlaced, PaymentReceived, OrderShipped and OrderCancelled from the
`orders` stream and maintains `orders` (order id → order) and
`customer-orders` (`<customerId>/<orderId>` → status and total). Amounts are
summed in whole cents; `cancelled` is final; events for unknown orders, a
second OrderPlaced and data that does not decode are rejected.
"""

from refract_sdk import Manifest, Projection, Rejected, Table, cents, data

EVENT_TYPES = ["OrderPlaced", "PaymentReceived", "OrderShipped", "OrderCancelled"]

ORDERS = Table("orders")
CUSTOMER_ORDERS = Table("customer-orders")


def field(event, value, name, kind):
    """`value[name]`, which must be of `kind` (the Rust plugin's serde types)."""
    if not isinstance(value, dict) or name not in value:
        raise Rejected(f"{event.event_type} at {event.stream}/{event.partition}@{event.offset}: "
                       f"data does not decode: missing field `{name}`")
    v = value[name]
    ok = isinstance(v, str) if kind is str else isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise Rejected(f"{event.event_type} at {event.stream}/{event.partition}@{event.offset}: "
                       f"data does not decode: invalid type for `{name}`")
    return v if kind is str else float(v)


class WitWorld(Projection):
    MANIFEST = (Manifest("order-summary", "0.1.0")
                .subscribe("orders", EVENT_TYPES)
                .table(ORDERS)
                .table(CUSTOMER_ORDERS))

    def apply(self, event):
        d = data(event)
        kind = event.event_type
        if kind == "OrderPlaced":
            order_id = field(event, d, "orderId", str)
            customer_id = field(event, d, "customerId", str)
            total = field(event, d, "total", float)
            for item in d.get("items", []) if isinstance(d.get("items", []), list) else [None]:
                field(event, item, "sku", str)
            if "description" in d and not isinstance(d["description"], str):
                field(event, d, "description", str)
            if ORDERS.get(order_id) is not None:
                raise Rejected(f"order {order_id} was already placed")
            order = {"orderId": order_id, "customerId": customer_id, "status": "placed",
                     "total": total, "paid": 0.0, "updatedAt": event.time}
        elif kind in EVENT_TYPES:
            order_id = field(event, d, "orderId", str)
            amount = field(event, d, "amount", float) if kind == "PaymentReceived" else 0.0
            order = ORDERS.get(order_id)
            if order is None:
                raise Rejected(f"{kind} for unknown order {order_id}")
            if order["status"] != "cancelled":
                if kind == "PaymentReceived":
                    paid = cents(order["paid"]) + cents(amount)
                    order["paid"] = paid / 100.0
                    if order["status"] == "placed" and paid >= cents(order["total"]):
                        order["status"] = "paid"
                elif kind == "OrderShipped":
                    order["status"] = "shipped"
                else:
                    order["status"] = "cancelled"
            order["updatedAt"] = event.time
        else:
            raise Rejected(f"unexpected event type {kind}")
        entry = {"orderId": order["orderId"], "status": order["status"], "total": order["total"]}
        CUSTOMER_ORDERS.put(f"{order['customerId']}/{order['orderId']}", entry)
        ORDERS.put(order["orderId"], order)

"""The order events of the examples and the rules that move an order's status,
in Python: the same as the Rust crate `order-events`, so that the Python
order plugins build the same read models as the Rust ones.

Plugins link this file into their directory (a symbolic link), since a
plugin builds from its own directory.
"""

from refract_sdk import Rejected, cents, data

EVENT_TYPES = ["OrderPlaced", "PaymentReceived", "OrderShipped", "OrderCancelled"]


def _field(event, value, name, kind):
    """``value[name]``, which must be of ``kind`` (the Rust plugins' serde types)."""
    where = f"{event.event_type} at {event.stream}/{event.partition}@{event.offset}: data does not decode"
    if not isinstance(value, dict) or name not in value:
        raise Rejected(f"{where}: missing field `{name}`")
    v = value[name]
    ok = isinstance(v, str) if kind is str else isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise Rejected(f"{where}: invalid type for `{name}`")
    return v if kind is str else float(v)


def decode(event):
    """The event's data, checked as the Rust plugins' serde types check it:
    ``{"orderId", ...}`` plus, for OrderPlaced, ``customerId``, ``total``,
    ``items`` (SKUs) and ``description``; for PaymentReceived, ``amount``."""
    d = data(event)
    kind = event.event_type
    if kind not in EVENT_TYPES:
        raise Rejected(f"unexpected event type {kind}")
    decoded = {"orderId": _field(event, d, "orderId", str)}
    if kind == "OrderPlaced":
        decoded["customerId"] = _field(event, d, "customerId", str)
        decoded["total"] = _field(event, d, "total", float)
        items = d.get("items", [])
        decoded["items"] = [_field(event, item, "sku", str) for item in (items if isinstance(items, list) else [None])]
        if "description" in d:
            decoded["description"] = _field(event, d, "description", str)
        else:
            decoded["description"] = ""
    elif kind == "PaymentReceived":
        decoded["amount"] = _field(event, d, "amount", float)
    return decoded


def advance(order, kind, change):
    """Apply a payment, shipment or cancellation to ``order`` (a dict with
    ``status``, ``paid``, ``total``); ``cancelled`` is final."""
    if order["status"] == "cancelled":
        return
    if kind == "PaymentReceived":
        paid = cents(order["paid"]) + cents(change["amount"])
        order["paid"] = paid / 100.0
        if order["status"] == "placed" and paid >= cents(order["total"]):
            order["status"] = "paid"
    elif kind == "OrderShipped":
        order["status"] = "shipped"
    elif kind == "OrderCancelled":
        order["status"] = "cancelled"


def unknown_order(kind, order_id):
    return Rejected(f"{kind} for unknown order {order_id}")


def already_placed(order_id):
    return Rejected(f"order {order_id} was already placed")


def next_order(event, orders, extra=lambda change: {}):
    """The order as ``event`` leaves it, read from and checked against the
    ``orders`` table: a new one for OrderPlaced (plus ``extra(change)``
    fields), else the stored one advanced. ``updatedAt`` is the event's time."""
    change = decode(event)
    kind = event.event_type
    if kind == "OrderPlaced":
        if orders.get(change["orderId"]) is not None:
            raise already_placed(change["orderId"])
        return {"orderId": change["orderId"], "customerId": change["customerId"], "status": "placed",
                "total": change["total"], "paid": 0.0, "updatedAt": event.time, **extra(change)}
    order = orders.get(change["orderId"])
    if order is None:
        raise unknown_order(kind, change["orderId"])
    advance(order, kind, change)
    order["updatedAt"] = event.time
    return order

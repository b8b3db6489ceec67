"""order-search in Python: the same table and search documents as the Rust plugin.

The seed's Elasticsearch `order_projection` mapping: index `orders` with
`orderId`, `customer` and `status` as keywords, `total` and `paid` as f64,
`updatedAt` as a date, `description` and `items` as text. The order's state
lives in the `orders` table; every change re-indexes its document.
"""

import order_events
from refract_sdk import Index, IndexMapping, Manifest, Projection, Table

ORDERS = Table("orders")
ORDER_INDEX = Index("orders")


class WitWorld(Projection):
    MANIFEST = Manifest("order-search", "0.1.0").subscribe("orders", order_events.EVENT_TYPES).table(ORDERS)
    INDEXES = [IndexMapping("orders").keyword("orderId").keyword("customer").keyword("status")
               .f64("total").f64("paid").date("updatedAt").text("description").text("items")]

    def apply(self, event):
        order = order_events.next_order(
            event, ORDERS, lambda change: {"description": change["description"], "items": " ".join(change["items"])})
        ORDER_INDEX.upsert(order["orderId"], {
            "orderId": order["orderId"], "customer": order["customerId"], "status": order["status"],
            "total": order["total"], "paid": order["paid"], "updatedAt": order["updatedAt"],
            "description": order["description"], "items": order["items"]})
        ORDERS.put(order["orderId"], order)

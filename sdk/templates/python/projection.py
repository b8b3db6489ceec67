"""{{name}}: a Refract projection. It counts the events of each type on the
`orders` stream; change MANIFEST and apply() to build your read model."""

from refract_sdk import Manifest, Projection, Table, data

COUNTS = Table("counts")


class WitWorld(Projection):
    MANIFEST = Manifest("{{name}}", "0.1.0").subscribe("orders").table(COUNTS)

    def apply(self, event):
        data(event)  # data that is not JSON becomes a dead letter
        count = COUNTS.get(event.event_type) or {"n": 0, "last": 0}
        count["n"] += 1
        count["last"] = event.time
        COUNTS.put(event.event_type, count)

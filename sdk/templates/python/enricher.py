"""{{name}}: a Refract enricher. It reads OrderPlaced from `orders` and emits
LargeOrderPlaced for orders whose total reaches the `threshold` setting
(default 100); route its output in refract.yaml (plugins.{{name}}.routes),
else it goes to the stream `{{name}}`."""

from refract_sdk import Enricher, Manifest, NewEvent, data, setting


class WitWorld(Enricher):
    MANIFEST = Manifest("{{name}}", "0.1.0").subscribe("orders", ["OrderPlaced"])

    def enrich_one(self, event):
        order = data(event)
        threshold = float(setting("threshold", "100"))
        if float(order.get("total", 0)) >= threshold:
            return [NewEvent("LargeOrderPlaced", order).derived_from(event)]
        return []

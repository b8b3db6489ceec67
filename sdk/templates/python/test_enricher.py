"""Run with: PYTHONPATH=.refract/sdk/python python3 -m unittest"""

import unittest

import refract_testing as host  # in-memory host interfaces; import before the plugin

from app import WitWorld


class LargeOrdersTest(unittest.TestCase):
    def setUp(self):
        host.reset()

    def test_only_large_orders_pass(self):
        out = WitWorld().enrich([host.event("orders", "OrderPlaced", {"orderId": "o-1", "total": 250}, key="o-1"),
                                 host.event("orders", "OrderPlaced", {"orderId": "o-2", "total": 20}, key="o-2")])
        self.assertEqual([(o.event_type, o.key) for o in out], [("LargeOrderPlaced", "o-1")])


if __name__ == "__main__":
    unittest.main()

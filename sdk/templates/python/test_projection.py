"""Run with: PYTHONPATH=.refract/sdk/python python3 -m unittest"""

import unittest

import refract_testing as host  # in-memory host interfaces; import before the plugin

from app import WitWorld


class CountsTest(unittest.TestCase):
    def setUp(self):
        host.reset()

    def test_counts_events_by_type(self):
        WitWorld().handle([host.event("orders", "OrderPlaced", {"orderId": "o-1"}),
                           host.event("orders", "OrderPlaced", {"orderId": "o-2"})])
        self.assertEqual(host.memory.get("counts", "OrderPlaced"), {"n": 2, "last": 0})

    def test_data_that_is_not_json_is_rejected(self):
        with self.assertRaises(host.Err) as failure:
            WitWorld().handle([host.event("orders", "OrderPlaced", b"not json")])
        self.assertIn("does not decode", failure.exception.value.value)


if __name__ == "__main__":
    unittest.main()

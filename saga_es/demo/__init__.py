"""The order-fulfillment saga used by the demo, the examples and the tests."""

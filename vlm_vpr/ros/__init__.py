"""The only ROS package of vlm_vpr: the `vpr_node` lifecycle node and its parameters, message
conversions, the TF adapter, bag replay, and an in-process harness for demo, benchmark and tests.
"""

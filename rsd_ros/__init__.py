"""ROS 2 glue: the policy node and message conversion around rsd_core."""

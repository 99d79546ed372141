"""RSD engine: RFSQ action tokenizer, main-model adapter, draft model and speculative decoding.

No ROS and no simulator imports live here.
"""

"""LIBERO side: the simulator bridge node, the scripted expert and the evaluation command."""

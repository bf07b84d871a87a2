"""ray-kd: distributed online knowledge distillation on Ray."""

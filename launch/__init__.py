"""Everything that touches Ray and DeepSpeed: translators from plans, and the few side-effect modules."""

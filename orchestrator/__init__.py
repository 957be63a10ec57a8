"""orch's command line, job lifecycle, controller, metrics and rendering (the edge of the system)."""

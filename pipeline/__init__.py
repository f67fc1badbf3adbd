"""GMR-Path whole-slide pipeline: read -> tissue -> tiles -> infer -> write, and the CLI."""

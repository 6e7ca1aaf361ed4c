"""The data: sources (one module per format, each dataset's record), the grain pipeline, augmentation and
users' images; shared/DESIGN.md, "Data flow"."""

"""Model building: synthetic lumbar MRI cohort, datasets, training loops, evaluation reports."""

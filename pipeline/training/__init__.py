"""Pieces of the stage-two trainer: expanding configs into members, schedules, evaluation, reports."""

"""What the notebooks use to show things: plots, live training curves, diagrams, reports, small helpers.
"""

"""`marl bench`: time as ratios to a compute floor, and memory, of one shared base vs separate models.
"""

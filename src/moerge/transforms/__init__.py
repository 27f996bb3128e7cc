"""moerge.transforms"""

"""moerge.merging"""

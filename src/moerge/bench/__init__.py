"""moerge.bench"""

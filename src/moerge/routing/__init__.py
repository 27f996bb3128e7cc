"""moerge.routing"""

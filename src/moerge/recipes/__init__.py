"""moerge.recipes"""

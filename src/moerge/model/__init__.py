"""moerge.model"""

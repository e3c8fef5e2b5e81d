"""The radiologist web app: routes, sessions, accounts, audit, assessments, key images, worklist
queries and the static pages."""
